"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) of an FSDP2 tiny Llama and fp8coat.AdamW, on
CPU ranks joined by gloo (``tests/distributed.py``): through ``fp8coat.save_sharded`` / ``load_sharded`` and
through DCP itself (the 1-rank save and the loads on 1 and 3 ranks: ``get_state_dict`` / ``dcp.save`` /
``dcp.load`` / ``set_state_dict``).

One training run per world size: a bf16 converted tiny Llama, matrices with FP8 moments and bf16-remainder
masters, vectors with fp32 moments and bf16-stochastic masters (so the rounding position matters), 6
micro-batches per step spread over the ranks. Each run saves after step 2 and goes on to step 4; runs resumed
from the checkpoints (into models and optimizers of other initial values and seeds) on the same or another number
of ranks must hold bit-identical states after loading and continue with the uninterrupted run's losses.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from helpers import assert_bit_equal
from test_fsdp_optim import (
    HYPER,
    SPECS,
    _grad,
    _initial,
    _param_groups,
    forward_backward,
    full_params,
    full_tensor,
    shard_llama,
    tiny_llama,
)

import fp8coat

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
transformers = pytest.importorskip("transformers")

STEPS, SAVE_AFTER, MICRO = 4, 2, 6
SEED = 1234  # the optimizer seed of the saved runs (resumed runs start from another)


def _model_and_optimizer(world_size: int, seed: int = 0, opt_seed: int = SEED, intermediate_size: int = 160):
    model = tiny_llama(torch.bfloat16, intermediate_size, seed)
    if world_size > 1:
        from torch.distributed.tensor import init_device_mesh

        shard_llama(model, init_device_mesh("cpu", (world_size,)))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = fp8coat.AdamW([{"params": matrices}, {"params": vectors, "master_weights": "bf16-stochastic"}],
                        lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, min_quantized_numel=1024, seed=opt_seed)
    return model, opt


def _snapshot(model, opt) -> dict:
    """Full tensors of the parameters and of every optimizer state (from ``opt.state_dict()``, by parameter name),
    the states' other entries, and the rounding position and seed."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    states = {names[id(params[i])]: {k: (full_tensor(v) if isinstance(v, DTensor) else v.clone()
                                         if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
              for i, state in sd["state"].items()}
    return {"params": full_params(model), "states": states, "groups": [g["fp8coat"] for g in sd["param_groups"]],
            "sr_calls": opt._sr_calls, "seed": opt.seed}


class _WritesHeld:
    """While active, checkpoint files are written only after ``release()``: an asynchronous save must return and
    let training go on while its writes wait."""

    def __init__(self):
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def __enter__(self):
        from torch.distributed.checkpoint import FileSystemWriter

        self._original = original = FileSystemWriter.write_data
        released = self._released

        def write_data(writer, plan, planner):
            if not released.wait(120):
                raise TimeoutError("checkpoint writes were never released")
            return original(writer, plan, planner)

        FileSystemWriter.write_data = write_data
        return self

    def __exit__(self, *exc):
        from torch.distributed.checkpoint import FileSystemWriter

        self._released.set()
        FileSystemWriter.write_data = self._original


def _train(rank: int, world_size: int, path: str, asynchronous: bool) -> dict:
    """The uninterrupted run: STEPS steps, saving into ``path`` after step SAVE_AFTER (asynchronously: the save
    returns while its writes are held, the next steps run, then the writes go ahead)."""
    model, opt = _model_and_optimizer(world_size)
    losses, saved, pending = [], None, None
    with _WritesHeld() as held:
        if not asynchronous:
            held.release()
        for step in range(STEPS):
            losses.append(float(forward_backward(model, world_size, rank, step, MICRO)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step + 1 == SAVE_AFTER:
                saved = _snapshot(model, opt)
                if asynchronous:
                    group = dist.new_group(backend="gloo")  # the background writer's collectives, apart from FSDP's
                    pending = fp8coat.save_sharded(model, opt, path, asynchronous=True, process_group=group)
                else:  # DCP itself, as save_sharded does it
                    import torch.distributed.checkpoint as dcp
                    from torch.distributed.checkpoint.state_dict import get_state_dict

                    model_sd, optim_sd = get_state_dict(model, opt)
                    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
        done_before_release = pending.done() if pending is not None else None
        held.release()
        if pending is not None:
            pending.result()
    return {"losses": losses, "saved": saved, "final": full_params(model), "done_before_release": done_before_release}


def _load_with_dcp(model, opt, path: str) -> None:
    """get_state_dict / dcp.load / set_state_dict, without load_sharded's checks (enough where the options and
    shapes are the saved ones)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _resume(rank: int, world_size: int, path: str, dcp_itself: bool = False) -> dict:
    """A fresh model and optimizer (other initial values, another seed) loaded from ``path``, then trained from step
    SAVE_AFTER to STEPS."""
    model, opt = _model_and_optimizer(world_size, seed=1, opt_seed=99)
    (_load_with_dcp if dcp_itself else fp8coat.load_sharded)(model, opt, path)
    loaded = _snapshot(model, opt)
    losses = []
    for step in range(SAVE_AFTER, STEPS):
        losses.append(float(forward_backward(model, world_size, rank, step, MICRO)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"loaded": loaded, "losses": losses, "final": full_params(model)}


def _mismatch(rank: int, world_size: int, path: str) -> dict:
    """Loading into a model with a bigger intermediate size: the error, and whether anything was loaded."""
    model, opt = _model_and_optimizer(world_size, seed=1, intermediate_size=192)
    before = full_params(model)
    try:
        fp8coat.load_sharded(model, opt, path)
        error = None
    except ValueError as e:
        error = str(e)
    after = full_params(model)
    return {"error": error, "unchanged": all(torch.equal(before[n], after[n]) for n in before)}


class _Holder(torch.nn.Module):
    """test_fsdp_optim's SPECS parameters as a model: uneven, empty ((1, 33) on 2 and 3 ranks) and last-dim
    shards, FP8 and fp32 moments."""

    def __init__(self, world_size: int, scale: float):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,)) if world_size > 1 else None
        for name, (_, _, dim) in SPECS.items():
            t = _initial(name, torch.bfloat16) * scale
            self.register_parameter(name, torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(dim)]) if mesh else t))
        self.opt = fp8coat.AdamW(_param_groups(dict(self.named_parameters())), master_weights="bf16-remainder",
                                 **HYPER["adversarial"], seed=int(scale))

    def train_steps(self, steps: int) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for step in range(steps):
            for name, p in self.named_parameters():
                g = _grad(name, step, torch.bfloat16)
                p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
            self.opt.step()


def _specs_saved(world_size: int, path: str) -> dict:
    holder = _Holder(world_size, scale=1.0)
    holder.train_steps(2)
    fp8coat.save_sharded(holder, holder.opt, path)
    return _snapshot(holder, holder.opt)


def _specs_loaded(world_size: int, path: str) -> dict:
    holder = _Holder(world_size, scale=2.0)
    fp8coat.load_sharded(holder, holder.opt, path)
    return _snapshot(holder, holder.opt)


def _one_rank_first(rank: int, world_size: int, directory: str) -> dict:
    return {"train": _train(rank, world_size, f"{directory}/w1", asynchronous=False)}


def _two_ranks(rank: int, world_size: int, directory: str) -> dict:
    out = {"train": _train(rank, world_size, f"{directory}/w2", asynchronous=True),
           "resume_same": _resume(rank, world_size, f"{directory}/w2"),
           "resume_from_1": _resume(rank, world_size, f"{directory}/w1"),
           "mismatch": _mismatch(rank, world_size, f"{directory}/w2"),
           "specs saved": _specs_saved(world_size, f"{directory}/specs")}
    out["specs loaded"] = _specs_loaded(world_size, f"{directory}/specs")
    return out


def _resume_only(rank: int, world_size: int, directory: str) -> dict:
    return {**_resume(rank, world_size, f"{directory}/w2", dcp_itself=True),
            "specs loaded": _specs_loaded(world_size, f"{directory}/specs")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{"1": the 1-rank run, "2": the 2-rank runs, "2->1": the 1-rank resumption of the 2-rank checkpoint, "dir"}."""
    directory = str(tmp_path_factory.mktemp("dcp"))
    one = run_ranks(_one_rank_first, 1, directory)[0]
    two = run_ranks(_two_ranks, 2, directory)
    back = run_ranks(_resume_only, 1, directory)[0]
    return {"1": one, "2": two[0], "2 rank 1": two[1], "2->1": back, "dir": directory}


def _assert_same_snapshot(loaded: dict, saved: dict, what: str) -> None:
    assert loaded["params"].keys() == saved["params"].keys()
    for name, value in saved["params"].items():
        assert_bit_equal(loaded["params"][name], value, f"{what}: parameter {name}")
    assert loaded["states"].keys() == saved["states"].keys()
    for name, state in saved["states"].items():
        assert loaded["states"][name].keys() == state.keys(), name
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert_bit_equal(loaded["states"][name][key], value, f"{what}: {name}.{key}")
            else:
                assert loaded["states"][name][key] == value, (what, name, key)
    assert (loaded["sr_calls"], loaded["seed"], loaded["groups"]) == (saved["sr_calls"], saved["seed"], saved["groups"])


def test_checkpoint_keeps_state_dtypes_and_bits(runs):
    """After loading (same world size, 2 -> 1 and 1 -> 2 ranks) the full tensors of the parameters and of every
    optimizer state equal the saved ones bit for bit, with their dtypes: FP8 (e4m3) moments, uint8 exponents, fp32
    absmax, int16 master remainders; each state's param_dtype; the rounding position and seed (per param group
    under "fp8coat"). The checkpoint files hold the same dtypes. Also for uneven, empty and last-dim shards
    (test_fsdp_optim's parameters)."""
    import torch.distributed.checkpoint as dcp

    saved = runs["2"]["train"]["saved"]
    states = saved["states"]
    matrix, vector = states["model.layers.0.mlp.up_proj.weight"], states["model.norm.weight"]
    assert matrix["exp_avg"].dtype == matrix["exp_avg_sq"].dtype == torch.float8_e4m3fn
    assert matrix["exp_avg_expo"].dtype == torch.uint8 and matrix["exp_avg_absmax"].dtype == torch.float32
    assert matrix["master_remainder"].dtype == torch.int16 and matrix["param_dtype"] == "bfloat16"
    assert vector["exp_avg"].dtype == torch.float32 and "master_remainder" not in vector
    assert saved["sr_calls"] == SAVE_AFTER and saved["seed"] == SEED
    assert saved["groups"] == [{"stochastic_rounding_calls": SAVE_AFTER, "seed": SEED}] * 2

    _assert_same_snapshot(runs["2"]["resume_same"]["loaded"], saved, "2 -> 2 ranks")
    _assert_same_snapshot(runs["2 rank 1"]["resume_same"]["loaded"], saved, "2 -> 2 ranks (rank 1)")
    _assert_same_snapshot(runs["2->1"]["loaded"], saved, "2 -> 1 rank")
    _assert_same_snapshot(runs["2"]["resume_from_1"]["loaded"], runs["1"]["train"]["saved"], "1 -> 2 ranks")
    for what, run in (("2 -> 2", runs["2"]), ("2 -> 2 (rank 1)", runs["2 rank 1"]), ("2 -> 1", runs["2->1"])):
        _assert_same_snapshot(run["specs loaded"], runs["2"]["specs saved"], f"uneven and empty shards {what}")

    files = dcp.FileSystemReader(f"{runs['dir']}/w2").read_metadata().state_dict_metadata
    prefix = "optimizer.state.model.layers.0.mlp.up_proj.weight."
    assert files[prefix + "exp_avg"].properties.dtype == torch.float8_e4m3fn
    assert files[prefix + "exp_avg_expo"].properties.dtype == torch.uint8
    assert files[prefix + "exp_avg_absmax"].properties.dtype == torch.float32
    assert files[prefix + "master_remainder"].properties.dtype == torch.int16


def test_resume_on_the_same_ranks_is_bit_exact(runs):
    """Saved on 2 ranks (asynchronously), resumed on 2 ranks: the same losses and final parameters, bit for bit
    (stochastic rounding included: its position and seed were restored)."""
    train, resumed = runs["2"]["train"], runs["2"]["resume_same"]
    assert resumed["losses"] == train["losses"][SAVE_AFTER:], (resumed["losses"], train["losses"])
    for name, value in train["final"].items():
        assert_bit_equal(resumed["final"][name], value, f"final {name}")


def test_asynchronous_save_lets_training_go_on(runs):
    """``save_sharded(..., asynchronous=True)`` returns while the checkpoint's writes are held back: the next
    steps ran before the save was complete (the Future not done), and the checkpoint still holds the state of
    the moment of the save (loaded bit for bit in the other tests)."""
    for train in (runs["2"]["train"], runs["2 rank 1"]["train"]):
        assert train["done_before_release"] is False
        assert len(train["losses"]) == STEPS


def _relative(a: list, b: list) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _assert_continues(resumed: list, uninterrupted: list, what: str) -> None:
    """Losses of a run resumed on another number of ranks against the uninterrupted run's from the same step. The
    first resumed step starts from the exact saved state and sees the same micro-batches: equal up to the order in
    which the micro-batch losses are summed (1e-6; measured equal). Later steps follow gradients accumulated in
    bf16 over the 6 micro-batches in another order (1 rank: all 6 in turn; 2 ranks: 3 each, then averaged; 3
    ranks: 2 each): within 2e-4 relative, the size of the difference between uninterrupted runs on 1 and on 2 ranks
    (measured 1.6e-5 after 2 steps, 5.6e-5 after 4; resumed runs 0.6e-5 to 4e-5)."""
    assert abs(resumed[0] - uninterrupted[0]) <= 1e-6 * abs(uninterrupted[0]), (what, resumed, uninterrupted)
    assert _relative(resumed, uninterrupted) <= 2e-4, (what, resumed, uninterrupted)


def test_resume_on_other_numbers_of_ranks_continues(runs):
    """2 -> 1 and 1 -> 2 ranks: the loaded states are exact (see above), and training continues with the
    uninterrupted run's losses within the differences of runs on 1 and on 2 ranks."""
    one, two = runs["1"]["train"], runs["2"]["train"]
    print(f"losses: 1 rank {one['losses']}, 2 ranks {two['losses']}, 2 -> 1 {runs['2->1']['losses']}, "
          f"1 -> 2 {runs['2']['resume_from_1']['losses']}")
    _assert_continues(runs["2->1"]["losses"], two["losses"][SAVE_AFTER:], "2 -> 1")
    _assert_continues(runs["2"]["resume_from_1"]["losses"], one["losses"][SAVE_AFTER:], "1 -> 2")


@pytest.mark.slow
def test_resume_on_three_ranks(runs):
    """2 -> 3 ranks (uneven shards: 64 rows as 22 + 21 + 21): the loaded states are bit-exact and training
    continues within the tolerance above."""
    three = run_ranks(_resume_only, 3, runs["dir"])
    for result in three:
        _assert_same_snapshot(result["loaded"], runs["2"]["train"]["saved"], "2 -> 3 ranks")
        _assert_same_snapshot(result["specs loaded"], runs["2"]["specs saved"], "uneven and empty shards 2 -> 3")
    print(f"losses: 2 ranks {runs['2']['train']['losses']}, 2 -> 3 {three[0]['losses']}")
    _assert_continues(three[0]["losses"], runs["2"]["train"]["losses"][SAVE_AFTER:], "2 -> 3")


def test_loading_into_a_model_of_other_shapes_names_the_parameter(runs):
    """A checkpoint of intermediate_size 160 loaded into a model of 192: a ValueError on every rank, before
    anything is loaded, naming the parameters and both shapes."""
    for result in (runs["2"]["mismatch"], runs["2 rank 1"]["mismatch"]):
        message = result["error"]
        assert message is not None and result["unchanged"]
        assert "model.layers.0.mlp.gate_proj.weight: shape (160, 64) in the checkpoint, (192, 64) in the model" in \
            message, message
        assert "model.layers.1.mlp.down_proj.weight: shape (64, 160)" in message, message


# ---------------------------------------------------------------------------------------------------------------
# one process, no process group


def _mlp(dtype: torch.dtype, layers: int = 2, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(layers)]).to(dtype)


def _stepped(model, **options):
    opt = fp8coat.AdamW(model.parameters(), lr=1e-2, **options)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        model(torch.randn(5, 64, generator=g).to(model[0].weight.dtype)).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_states_load_as_saved_under_other_options_and_dtypes(tmp_path):
    """A checkpoint of bf16 parameters with FP8 moments and bf16-remainder masters, loaded into float32
    parameters whose optimizer was made with fp32 moments: the states load with their saved dtypes (DCP alone
    casts the FP8 codes to the current fp32 moments and drops the remainders, which AdamW.load_state_dict then
    refuses), the saved options are adopted, and the float32 parameters get the exact fp32 masters: as
    ``load_state_dict`` of the same state in memory."""
    saved_model = _mlp(torch.bfloat16)
    saved_opt = _stepped(saved_model, min_quantized_numel=1)
    fp8coat.save_sharded(saved_model, saved_opt, tmp_path / "ckpt")

    model, reference = _mlp(torch.float32, seed=1), _mlp(torch.float32, seed=1)
    opt = fp8coat.AdamW(model.parameters(), min_quantized_numel=10**9)
    fp8coat.load_sharded(model, opt, tmp_path / "ckpt")
    ref_opt = fp8coat.AdamW(reference.parameters(), min_quantized_numel=10**9)
    reference.load_state_dict(saved_model.state_dict())
    ref_opt.load_state_dict(saved_opt.state_dict())
    assert opt.param_groups[0]["min_quantized_numel"] == 1
    for p, q, s in zip(model.parameters(), reference.parameters(), saved_model.parameters()):
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state.keys() == ref_state.keys() == saved_opt.state[s].keys()
        for key, value in saved_opt.state[s].items():
            assert_bit_equal(state[key], value, key)
    opt.state_dict(), ref_opt.state_dict()  # (brings the states up to the float32 parameters: masters written)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_bit_equal(p.detach(), q.detach(), "fp32 master")
        assert "master_remainder" not in opt.state[p]
    x = torch.randn(5, 64)
    for m, o in ((model, opt), (reference, ref_opt)):
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_bit_equal(p.detach(), q.detach(), "after a step")


def test_strict_load_names_the_parameters_only_the_checkpoint_holds(tmp_path):
    """DCP skips checkpoint entries the model lacks; load_sharded names them (strict=True), and loads the rest
    with strict=False. Also for the model alone (optimizer None)."""
    big = _mlp(torch.float32, layers=3)
    fp8coat.save_sharded(big, _stepped(big), tmp_path / "big")
    fp8coat.save_sharded(big, None, tmp_path / "model-only")
    for path, make_opt in ((tmp_path / "big", True), (tmp_path / "model-only", False)):
        small = _mlp(torch.float32, layers=2, seed=1)
        opt = fp8coat.AdamW(small.parameters()) if make_opt else None
        with pytest.raises(ValueError) as info:
            fp8coat.load_sharded(small, opt, path)
        assert "2.weight: in the checkpoint, not in the model" in str(info.value)
        assert "2.bias: in the checkpoint, not in the model" in str(info.value)
        assert not torch.equal(small[0].weight, big[0].weight)  # (nothing was loaded)
        fp8coat.load_sharded(small, opt, path, strict=False)
        assert torch.equal(small[0].weight, big[0].weight) and torch.equal(small[1].bias, big[1].bias)
