"""fp8coat.AdamW on sharded (DTensor) parameters, on CPU ranks joined by gloo (``tests/distributed.py``).

* Numerics: parameters sharded on dim 0 across 2 ranks (uneven shards, empty shards, 1-D parameters, FP8 and
  fp32 moments, one parameter sharded along its last dim with fp32 moments), stepped from gradients distributed
  from one full gradient (zeros, tiny and huge values, NaN and inf), give parameters and states whose full tensors
  are bit-identical to one process stepping the full tensors: master weights fp32, bf16-remainder and none,
  backends torch and triton (the interpreter on the CPU). bf16-stochastic rounds with bits drawn per local
  element offset, so its parameters differ from the unsharded run's: it is tested for closeness and bias.
* Structure: ``opt.state`` holds local tensors of local shapes; ``opt.state_dict()`` presents them as DTensors
  of the parameter's mesh, placements and global shape, sharing storage; ``state_nbytes`` counts local bytes; the
  step communicates nothing.
* Training: a converted tiny Llama under FSDP2 (``fully_shard``) on 2 ranks against 1 rank that accumulates
  the same micro-batches; gradient-norm clipping over DTensor gradients.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from helpers import adversarial, assert_bit_equal, finite_random

import fp8coat

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

HYPER = {"adversarial": dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
         "drift": dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)}  # steps of ~1/8 bf16 spacing
STEPS = 4
WORLD = 2

# name: (global shape, param group, sharded dim). Group 0 keeps FP8 moments (min_quantized_numel=1), group 1 fp32
# moments. On 2 ranks: "uneven" 2 + 1 rows, "empty*" 1 + 0 rows, "ragged" rows of 160 (a partial group of 128),
# "cols" sharded along its last dim (11 + 10 columns; allowed with fp32 moments).
SPECS = {
    "uneven": ((3, 256), 0, 0),
    "empty": ((1, 33), 0, 0),
    "ragged": ((5, 160), 0, 0),
    "empty32": ((1, 33), 1, 0),
    "bias": ((37,), 1, 0),
    "cols": ((6, 21), 1, 1),
}
GROUP_OPTIONS = ({"min_quantized_numel": 1}, {"min_quantized_numel": 10**9})
MASTER_DTYPES = {"fp32": torch.float32, "bf16-remainder": torch.bfloat16, "none": torch.bfloat16,
                 "bf16-stochastic": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# inputs, the same in every process


def _initial(name: str, dtype: torch.dtype, inputs: str = "adversarial") -> torch.Tensor:
    """Initial full parameter: magnitudes 1e-3..1, or uniform in [1.1, 1.9) for ``inputs="drift"`` (one bf16
    spacing, 2^-7, everywhere)."""
    shape, seed = SPECS[name][0], 100 + list(SPECS).index(name)
    if inputs == "drift":
        return (1.1 + 0.8 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)
    return finite_random(shape, seed=seed, scale_range=(-3.0, 0.0)).to(dtype)


def _grad(name: str, step: int, dtype: torch.dtype, inputs: str = "adversarial") -> torch.Tensor:
    """Step ``step``'s full gradient of ``name``. ``adversarial``: zeros, ±0, subnormals, 1e-30..1e30, ±inf and
    NaN on steps 0 and 2, finite values of magnitudes 1e-6..10 on the others. ``drift``: the same finite gradient
    every step (each parameter drifts one way)."""
    shape, seed = SPECS[name][0], 1000 * step + list(SPECS).index(name)
    if inputs == "drift":
        return finite_random(shape, seed=list(SPECS).index(name), scale_range=(-2.0, 0.0)).to(dtype)
    if step % 2 == 0:
        g = adversarial(shape, seed=seed)
        if g.numel() < 16:  # (adversarial mixes its specials into tensors of >= 16 elements)
            g.view(-1)[:3] = torch.tensor([0.0, float("nan"), 1e30])
        return g.to(dtype)
    return finite_random(shape, seed=seed, scale_range=(-6.0, 1.0)).to(dtype)


def _param_groups(params: dict) -> list[dict]:
    return [dict(params=[params[n] for n in SPECS if SPECS[n][1] == gi], **options)
            for gi, options in enumerate(GROUP_OPTIONS)]


def _reference(master: str, backend: str, steps: int = STEPS, inputs: str = "adversarial",
               dtype: "torch.dtype | None" = None) -> dict:
    """One process, full tensors: parameters, states (by parameter name) and the non-finite count. ``dtype``:
    of the parameters and gradients, converted from those of the master mode's dtype."""
    own = MASTER_DTYPES[master]
    dtype = own if dtype is None else dtype
    params = {n: torch.nn.Parameter(_initial(n, own, inputs).to(dtype)) for n in SPECS}
    opt = fp8coat.AdamW(_param_groups(params), backend=backend, master_weights=master, **HYPER[inputs])
    for step in range(steps):
        for n, p in params.items():
            p.grad = _grad(n, step, own, inputs).to(dtype)
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in params.items()},
            "states": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()},
            "count": int(opt.nonfinite_grad_count), "nbytes": opt.state_nbytes()}


# ---------------------------------------------------------------------------------------------------------------
# the step communicates nothing


class _NoCollectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises on any collective: ``torch.distributed``'s calls reach the ``c10d`` ops, DTensor's redistributions
    and functional collectives the ``_c10d_functional`` ones."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            raise AssertionError(f"communication inside the optimizer step: {func}")
        return func(*args, **(kwargs or {}))


def _catches_collectives(mesh) -> dict:
    """Whether the guard trips on a torch.distributed call and on a DTensor gather (so the guarded steps that
    pass really did not communicate)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    d = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    caught = {}
    for what, call in (("all_reduce", lambda: dist.all_reduce(torch.ones(2))), ("full_tensor", d.full_tensor)):
        try:
            with _NoCollectives():
                call()
            caught[what] = False
        except AssertionError:
            caught[what] = True
    dist.barrier()  # (both ranks tripped before communicating)
    return caught


# ---------------------------------------------------------------------------------------------------------------
# the sharded run


def full_tensor(d) -> torch.Tensor:
    """``d.full_tensor()`` of any dtype (gloo gathers neither FP8 nor int16: the bytes are gathered as uint8)."""
    from torch.distributed.tensor import DTensor

    as_bytes = d.to_local().contiguous().unsqueeze(-1).view(torch.uint8)  # (*local shape, element size)
    shape = (*d.shape, d.element_size())
    gathered = DTensor.from_local(as_bytes, d.device_mesh, d.placements, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride()).full_tensor()
    return gathered.view(d.dtype).reshape(d.shape)


def _local_bytes(local_shape: tuple, fp8: bool, master: str) -> int:
    """Bytes of one parameter's state on this rank, from the layout table of ``layout.py``."""
    n = math.prod(local_shape)
    if fp8:  # codes of m and v (1 byte each) + per group of 128 along the last dim: fp32 absmax + uint8 expo, x2
        groups = n // local_shape[-1] * math.ceil(local_shape[-1] / 128) if n else 0
        total = 2 * n + 2 * 5 * groups
    else:
        total = 2 * 4 * n
    return total + (2 * n if master == "bf16-remainder" else 0)


def _sharded_run(rank: int, world_size: int, backend: str, masters: tuple, steps: int, inputs: str) -> dict:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    out = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "guard": _catches_collectives(mesh)}
    for master in masters:
        dtype = MASTER_DTYPES[master]
        params = {n: torch.nn.Parameter(distribute_tensor(_initial(n, dtype, inputs), mesh, [Shard(SPECS[n][2])]))
                  for n in SPECS}
        opt = fp8coat.AdamW(_param_groups(params), backend=backend, master_weights=master, **HYPER[inputs])
        for step in range(steps):
            for n, p in params.items():
                p.grad = distribute_tensor(_grad(n, step, dtype, inputs), mesh, [Shard(SPECS[n][2])])
            with _NoCollectives():
                opt.step()
        if backend == "triton":  # every local shard went to the fused step (each group's plan holds all 3)
            assert sorted(len(plan.params) for plan in opt._plans.values()) == [3, 3], opt._plans

        # opt.state: plain local tensors of local shapes; state_dict: DTensors sharing their storage
        expected_bytes = 0
        sd = opt.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        for n, p in params.items():
            local, fp8 = p.to_local(), SPECS[n][1] == 0
            state = opt.state[p]
            assert all(not isinstance(v, DTensor) for v in state.values()), n
            assert state["exp_avg"].shape == local.shape, (n, state["exp_avg"].shape, local.shape)
            assert state["exp_avg"].dtype == (torch.float8_e4m3fn if fp8 else torch.float32), n
            side = (*local.shape[:-1], math.ceil(p.shape[-1] / 128))
            if fp8:
                assert state["exp_avg_absmax"].shape == side and state["exp_avg_sq_expo"].shape == side, n
            saved = sd["state"][index[id(p)]]
            assert not isinstance(saved["step"], DTensor)
            for key, value in state.items():
                if key == "step":
                    continue
                d = saved[key]
                assert isinstance(d, DTensor), (n, key)
                assert d.device_mesh == mesh and d.placements == p.placements, (n, key, d.placements)
                global_shape = p.shape if value.shape == local.shape else (*p.shape[:-1], side[-1])
                assert d.shape == global_shape, (n, key, d.shape, global_shape)
                assert d.to_local().data_ptr() == value.data_ptr() or value.numel() == 0, (n, key)
            expected_bytes += _local_bytes(tuple(local.shape), fp8, master)
        assert opt.state_nbytes() == expected_bytes, (opt.state_nbytes(), expected_bytes)

        count = opt.nonfinite_grad_count.clone()
        dist.all_reduce(count)
        full = {"params": {n: full_tensor(p.detach()) for n, p in params.items()},
                "states": {n: {k: (full_tensor(v) if isinstance(v, DTensor) else v.clone())
                               for k, v in sd["state"][index[id(p)]].items() if k != "param_dtype"}
                           for n, p in params.items()},
                "count": int(count), "nbytes": opt.state_nbytes(), "local_count": int(opt.nonfinite_grad_count)}
        out[master] = full if rank == 0 else {"nbytes": full["nbytes"], "local_count": full["local_count"]}
    return out


def _check_against_reference(results: list, master: str, backend: str) -> None:
    ref = _reference(master, backend)
    got = results[0][master]
    for n in SPECS:
        assert_bit_equal(got["params"][n], ref["params"][n], f"{master} {backend} param {n}")
        assert set(got["states"][n]) == set(ref["states"][n]), n
        for key, value in ref["states"][n].items():
            assert_bit_equal(got["states"][n][key], value, f"{master} {backend} {n}.{key}")
    assert got["count"] == ref["count"] > 0
    assert sum(r[master]["local_count"] for r in results) == ref["count"]
    assert sum(r[master]["nbytes"] for r in results) == ref["nbytes"]  # (the side tensors' rows split too)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sharded_step_is_bit_exact_with_the_unsharded_step(backend):
    """Full tensors of sharded parameters and of every state (gathered from ``opt.state_dict()``'s DTensors)
    after 4 steps equal the unsharded optimizer's bit for bit, for master weights fp32, bf16-remainder and
    none; non-finite gradient elements are counted on the rank that holds them; no step communicates."""
    masters = ("fp32", "bf16-remainder", "none")
    results = run_ranks(_sharded_run, WORLD, backend, masters, STEPS, "adversarial")
    for r in results:
        assert r["guard"] == {"all_reduce": True, "full_tensor": True}
        if backend == "triton" and not torch.cuda.is_available():
            assert r["TRITON_INTERPRET"] == "1"  # the ranks run the interpreter, as this process does
    for master in masters:
        _check_against_reference(results, master, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_stochastic_sharded_is_unbiased(backend):
    """bf16-stochastic draws its rounding bits from (seed, index of the tensor in its launch, element offset in the
    local shard): sharded parameters are rounded with other bits than unsharded ones (and elements at the same
    local offset of two shards can draw the same bits), so the runs differ in the last bits. What holds: the moments
    (which do not depend on the parameters) are bit-exact, and the parameters follow an fp32-master run on the
    same gradients without bias. Steps of ~1/8 bf16 spacing (lr 1e-3 on values in [1.1, 1.9)), 10 of them:
    round-to-nearest would not move at all (a bias of about -1.2 spacings along the drift, checked); the sharded
    stochastic run's mean error along the drift must stay below 0.1 spacing, and every element within 8 (a random
    walk of 10 unbiased roundings)."""
    steps, spacing = 10, 2.0**-7
    results = run_ranks(_sharded_run, WORLD, backend, ("bf16-stochastic",), steps, "drift")
    got = results[0]["bf16-stochastic"]
    unsharded = _reference("bf16-stochastic", backend, steps, "drift")
    fp32 = _reference("fp32", backend, steps, "drift", dtype=torch.float32)  # from the same bf16 values
    nearest = _reference("none", "torch", steps, "drift")
    for n in SPECS:
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bit_equal(got["states"][n][key], unsharded["states"][n][key], f"{n}.{key}")

    def error_along_drift(params):  # (p - p_fp32) · sign of the drift, in bf16 spacings, every element
        return torch.cat([((params[n].float() - fp32["params"][n])
                           * torch.sign(fp32["params"][n] - _initial(n, torch.bfloat16, "drift").float())).flatten()
                          for n in SPECS]) / spacing

    err, err_nearest = error_along_drift(got["params"]), error_along_drift(nearest["params"])
    differ = sum(int((got["params"][n] != unsharded["params"][n]).sum()) for n in SPECS)
    print(f"bf16-stochastic {backend}: {differ} of {err.numel()} parameters differ from the unsharded run; along "
          f"the drift vs fp32 masters: mean {err.mean():+.3f}, max |.| {err.abs().max():.1f} spacings "
          f"(round to nearest: mean {err_nearest.mean():+.3f})")
    assert err_nearest.mean() < -0.5  # the measure sees a biased rounding
    assert err.mean().abs() < 0.1, err.mean()
    assert err.abs().max() <= 8, err.abs().max()


def _refused_last_dim(mesh) -> str:
    from torch.distributed.tensor import Shard, distribute_tensor

    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 256), mesh, [Shard(1)]))
    opt = fp8coat.AdamW([w], min_quantized_numel=1)
    w.grad = distribute_tensor(torch.randn(4, 256), mesh, [Shard(1)])
    with pytest.raises(ValueError) as info:
        opt.step()
    assert not opt.state.get(w)
    return str(info.value)


def _loaded_elsewhere(mesh) -> dict:
    """The DTensor state dict of a sharded optimizer (bf16-remainder: FP8, uint8, fp32 and int16 states) loaded into
    optimizers of the full parameters: plain tensors, and DTensors placed Replicate() (both gather the states:
    through uint8 bytes, as gloo gathers no FP8 nor int16)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dtype = torch.bfloat16
    params = {n: torch.nn.Parameter(distribute_tensor(_initial(n, dtype), mesh, [Shard(SPECS[n][2])])) for n in SPECS}
    opt = fp8coat.AdamW(_param_groups(params), master_weights="bf16-remainder", **HYPER["adversarial"])
    for step in range(2):
        for n, p in params.items():
            p.grad = distribute_tensor(_grad(n, step, dtype), mesh, [Shard(SPECS[n][2])])
        opt.step()
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    expected = {n: {k: full_tensor(v) for k, v in sd["state"][index[id(p)]].items() if isinstance(v, DTensor)}
                for n, p in params.items()}
    out = {}
    for kind in ("plain", "replicated"):
        full = {n: _initial(n, dtype) for n in SPECS}
        others = {n: torch.nn.Parameter(t if kind == "plain" else distribute_tensor(t, mesh, [Replicate()]))
                  for n, t in full.items()}
        other_opt = fp8coat.AdamW(_param_groups(others), master_weights="bf16-remainder")
        other_opt.load_state_dict(sd)
        for n, p in others.items():
            for key, value in expected[n].items():
                got = other_opt.state[p][key]
                assert not isinstance(got, DTensor)
                assert_bit_equal(got, value, f"{kind} {n}.{key}")
        out[kind] = True
        if kind == "plain":  # and back: the plain (full) state dict into sharded parameters takes each rank's slice
            back = {n: torch.nn.Parameter(distribute_tensor(_initial(n, dtype), mesh, [Shard(SPECS[n][2])]))
                    for n in SPECS}
            back_opt = fp8coat.AdamW(_param_groups(back), master_weights="bf16-remainder")
            back_opt.load_state_dict(other_opt.state_dict())
            back_sd = back_opt.state_dict()
            back_index = {id(p): i for i, p in enumerate(p for g in back_opt.param_groups for p in g["params"])}
            for n, p in back.items():
                for key, value in expected[n].items():
                    assert back_opt.state[p][key].shape[:1] == p.to_local().shape[:1], (n, key)
                    assert_bit_equal(full_tensor(back_sd["state"][back_index[id(p)]][key]), value, f"back {n}.{key}")
            out["plain back into sharded"] = True
    return out


def _other_cases(rank: int, world_size: int) -> dict:
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    return {"refused": _refused_last_dim(mesh), "loaded elsewhere": _loaded_elsewhere(mesh)}


@pytest.fixture(scope="module")
def other_cases() -> list:
    return run_ranks(_other_cases, WORLD)


def test_fp8_moments_of_a_parameter_sharded_along_its_last_dim_are_refused(other_cases):
    """Groups of 128 run along the last dim: sharding it would split them (and each rank would hold its own
    absmax for half a group). The step raises a ValueError that names the parameter and the ways out."""
    for result in other_cases:
        message = result["refused"]
        assert "param_groups[0].params[0]" in message and "last dim" in message, message
        assert "shard another dim" in message and "min_quantized_numel" in message, message


def test_sharded_state_dict_loads_into_unsharded_and_replicated_parameters(other_cases):
    """``opt.state_dict()`` of sharded parameters loads into an optimizer of plain full parameters and of
    Replicate() DTensors: every state tensor equals the gathered full tensor bit for bit (a gloo group gathers no
    FP8 or int16 tensors: the states travel as bytes). The plain optimizer's state dict (full tensors) loads back
    into sharded parameters, each rank taking its rows."""
    expected = {"plain": True, "replicated": True, "plain back into sharded": True}
    assert all(result["loaded elsewhere"] == expected for result in other_cases)


# ---------------------------------------------------------------------------------------------------------------
# a converted tiny Llama under FSDP2


MICRO = 2  # micro-batches per step: one per rank on 2 ranks, accumulated on 1 rank


def tiny_llama(dtype: torch.dtype, intermediate_size: int = 160, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama converted with the coat recipe (the same weights in every process)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=intermediate_size,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return fp8coat.convert(transformers.LlamaForCausalLM(cfg).to(dtype), "coat").train()


def micro_batch(step: int, index: int) -> torch.Tensor:
    return torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(7919 * step + index))


def shard_llama(model: torch.nn.Module, mesh, reduce_dtype: "torch.dtype | None" = None) -> None:
    """FSDP2 as in training: each decoder layer, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def forward_backward(model, world_size: int, rank: int, step: int, micro: int = MICRO) -> torch.Tensor:
    """This rank's share of the ``micro`` micro-batches of ``step`` (micro-batch i goes to rank i % world_size),
    accumulated and averaged (FSDP averages over ranks); returns the step's loss averaged over all micro-batches
    (the same number on every rank)."""
    mine = [i for i in range(micro) if i % world_size == rank]
    total = torch.zeros((), dtype=torch.float32)
    for i in mine:
        ids = micro_batch(step, i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        total += loss.detach().float()
    if len(mine) > 1:
        for p in model.parameters():
            p.grad.mul_(1.0 / len(mine))  # (exact for a power of two)
    if world_size > 1:
        dist.all_reduce(total)
    return total / micro


def full_params(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {n: (full_tensor(p.detach()) if isinstance(p, DTensor) else p.detach().clone())
            for n, p in model.named_parameters()}


def _llama_run(rank: int, world_size: int, dtype: torch.dtype, reduce_dtype, steps: int, clip: "float | None"
               ) -> dict:
    """``steps`` training steps of the tiny Llama: on 1 rank an unsharded model (no FSDP), on more ranks FSDP2.
    Returns the per-step losses, gradient norms and first clipped gradients (when clipping) and the final full
    parameters."""
    model = tiny_llama(dtype)
    if world_size > 1:
        from torch.distributed.tensor import init_device_mesh

        shard_llama(model, init_device_mesh("cpu", (world_size,)), reduce_dtype)
    opt = fp8coat.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, min_quantized_numel=1024)
    losses, norms, grads = [], [], None
    for step in range(steps):
        losses.append(float(forward_backward(model, world_size, rank, step)))
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            if step == 0:
                grads = {n: full_tensor(p.grad) if world_size > 1 else p.grad.clone()
                         for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "norms": norms, "grads": grads, "params": full_params(model)}


# name: (param dtype, FSDP reduce dtype, steps, clip_grad_norm_ max norm)
LLAMA_RUNS = {
    "fp32": (torch.float32, torch.float32, 4, None),
    "bf16": (torch.bfloat16, None, 4, None),  # (gradients reduced in bf16)
    "fp32-clip": (torch.float32, torch.float32, 3, 0.3),  # (the gradient norm is about 1.45)
}


def _llama_runs(rank: int, world_size: int) -> dict:
    return {name: _llama_run(rank, world_size, *args) for name, args in LLAMA_RUNS.items()}


@pytest.fixture(scope="module")
def llama_runs() -> dict:
    """{run name: (1 rank, 2 ranks)}: each run of LLAMA_RUNS on 1 rank (unsharded, the 2 micro-batches
    accumulated) and on 2 ranks (FSDP2, one micro-batch each)."""
    pytest.importorskip("transformers")
    one, two = run_ranks(_llama_runs, 1)[0], run_ranks(_llama_runs, 2)[0]
    return {name: (one[name], two[name]) for name in LLAMA_RUNS}


def _max_diffs(a: dict, b: dict) -> tuple[float, float]:
    """Largest absolute difference over all tensors, and the largest one relative to the tensor's max |b|."""
    abs_, rel = 0.0, 0.0
    for n in b:
        d = (a[n].double() - b[n].double()).abs().max().item()
        abs_, rel = max(abs_, d), max(rel, d / max(b[n].double().abs().max().item(), 1e-30))
    return abs_, rel


@pytest.mark.parametrize("run", ["fp32", "bf16"])
def test_fsdp2_training_matches_one_rank_accumulating_the_micro_batches(llama_runs, run):
    """FSDP2 (each decoder layer, then the root) on 2 ranks, one micro-batch per rank, against one unsharded
    process that accumulates both micro-batches (the FP8 per-tensor activation scales depend on the micro-batch,
    so the reference must see the same ones): per-step losses and final parameters are bit-identical, for fp32
    parameters (fp32 masters) and bf16 parameters (bf16-remainder). Exact because FSDP's reduce-scatter averages
    (gloo: sums, then divides by the world size) and on 2 ranks that is one addition of two terms, whose rounding
    does not depend on the order, followed by an exact halving: what the reference's accumulation and 0.5 scaling
    do; with more ranks the order of the additions would differ in the last bits."""
    one, two = llama_runs[run]
    assert two["losses"] == one["losses"], (two["losses"], one["losses"])
    assert len(set(one["losses"])) == len(one["losses"])  # (it trained: the losses change)
    for n, p in one["params"].items():
        assert_bit_equal(two["params"][n], p, f"{run} {n}")


def test_clip_grad_norm_over_dtensor_gradients_matches_unsharded(llama_runs):
    """torch.nn.utils.clip_grad_norm_ over the DTensor gradients of the FSDP2 model returns the norm of the
    unsharded model's gradient and clips it alike. The norm sums squares shard by shard, then across ranks: not
    the unsharded order, so it may differ in the last bit (measured: equal at steps 1-2, 1 ulp apart at step 3);
    tolerance 1e-6 relative. The clipped gradients of step 1 are bit-identical (equal norms); after 3 clipped
    steps the parameters stay within 1e-6 of their largest magnitude (measured 1e-7)."""
    one, two = llama_runs["fp32-clip"]
    assert all(norm > 0.3 for norm in one["norms"])  # (clipping is active)
    for a, b in zip(two["norms"], one["norms"]):
        assert abs(a - b) <= 1e-6 * b, (two["norms"], one["norms"])
    for n, g in one["grads"].items():
        assert_bit_equal(two["grads"][n], g, f"clipped gradient {n}")
    for a, b in zip(two["losses"], one["losses"]):
        assert abs(a - b) <= 1e-6 * b, (two["losses"], one["losses"])
    max_abs, max_rel = _max_diffs(two["params"], one["params"])
    print(f"clipped training, 2 ranks vs 1: norms {two['norms']} vs {one['norms']}; parameters max abs diff "
          f"{max_abs:.3g}, max rel (to the tensor's max) {max_rel:.3g}")
    assert max_rel <= 1e-6
