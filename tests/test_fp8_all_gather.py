"""FP8 all-gather of converted linear weights under FSDP2, on 2 CPU ranks (gloo).

Reference: the same model sharded without it (FSDP2 gathers the BF16 weight, the layer quantizes it). The FP8
gather must give the same forward bit for bit, the same weight gradients for layers that do not share their
input with siblings (their input gradient uses the transposed gathered codes, which equal the quantized
transposed weight), move at most 0.52x the bytes, and keep checkpoints plain.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks
from helpers import sqnr_db

import fp8coat
from fp8coat.nn.fp8_all_gather import FP8AllGatherWeight, enable_fp8_all_gather, precompute_fp8_scales
from fp8coat.quantization.reference import scale_from_amax

transformers = pytest.importorskip("transformers")
fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


def _tiny_llama(intermediate: int = 176) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).bfloat16()


def _sharded(fp8_gather: bool, intermediate: int = 176):
    model = fp8coat.convert(_tiny_llama(intermediate), "coat").train()
    if fp8_gather:
        assert enable_fp8_all_gather(model) == 14  # 7 linears per layer
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _batch(rank: int, step: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(10 + step))
    return ids[2 * rank: 2 * rank + 2]


class _GatherBytes:
    """Counts the bytes each rank contributes to all-gathers (FSDP2 calls ``dist.all_gather_single`` or, in older
    torch, ``dist.all_gather_into_tensor``)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.nbytes = 0
        self._originals = {n: getattr(torch.distributed, n) for n in self.NAMES if hasattr(torch.distributed, n)}

    def __enter__(self):
        for name, original in self._originals.items():
            def counting(output, input, *args, _original=original, **kwargs):
                self.nbytes += input.numel() * input.element_size()
                return _original(output, input, *args, **kwargs)

            setattr(torch.distributed, name, counting)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.distributed, name, original)


def _forward_backward_worker(rank: int, world: int, fp8_gather: bool):
    model = _sharded(fp8_gather)
    ids = _batch(rank)
    with _GatherBytes() as gathered:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    layer0 = model.model.layers[0]
    kinds = {type(layer0.mlp.down_proj.weight._local_tensor).__name__}
    return out.logits.detach(), grads, gathered.nbytes, kinds


def test_fp8_gather_matches_bf16_gather_and_halves_the_bytes():
    (logits_b, grads_b, bytes_b, kinds_b), _ = run_ranks(_forward_backward_worker, 2, False)
    (logits_f, grads_f, bytes_f, kinds_f), _ = run_ranks(_forward_backward_worker, 2, True)
    assert kinds_b == {"Tensor"} and kinds_f == {"FP8AllGatherWeight"}
    # forward: the gathered codes are the codes of the gathered weight under the same scale
    assert torch.equal(logits_f, logits_b)
    # the last layer's MLP: down_proj has no siblings; gate/up get the same output gradient through down_proj's
    # input gradient, which uses the transposed gathered codes (= the quantized transposed weight)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(grads_f[name], grads_b[name]), name
    # earlier gradients pass through the input gradients of sibling groups (q/k/v, gate/up), whose gathered codes
    # are re-quantized under the group's joint scale: close, not equal
    for name, ref in grads_b.items():
        err = (grads_f[name].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
        assert err < 0.15, (name, float(err))
    # bytes this rank contributes (its half of each weight): per layer and pass (forward, backward) the 7 linear
    # weights (46,080 elements) as E4M3 codes instead of bf16, the 2 norms (128) as bf16 in both runs; the root
    # (embedding, head, final norm) is gathered as bf16 in both
    linear, norms, root = 64 * 64 * 2 + 32 * 64 * 2 + 176 * 64 * 3, 2 * 64, (96 * 64 * 2 + 64) * 2 // 2
    gathers = 2 * 2  # layers x passes
    assert bytes_b == root + gathers * (linear + norms) * 2 // 2
    assert bytes_f == root + gathers * (linear * 1 + norms * 2) // 2
    assert (bytes_f - root) / (bytes_b - root) <= 0.52  # 0.501 (the linear weights alone: 0.500)


def _scale_worker(rank: int, world: int):
    model = _sharded(True)
    opt = fp8coat.AdamW(model.parameters(), lr=1e-2, min_quantized_numel=0)
    ids = _batch(rank)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    shards = [m.weight._local_tensor for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
              and isinstance(m.weight._local_tensor, FP8AllGatherWeight)]
    calls = []
    original = torch.distributed.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        precompute_fp8_scales(model)
        after_precompute = len(calls)
        ids = _batch(rank, 1)
        model(input_ids=ids, labels=ids).loss.backward()
        in_step = len(calls) - after_precompute
    finally:
        torch.distributed.all_reduce = original
    expected = [scale_from_amax(m.weight.full_tensor().float().abs().max(), fp8coat.E4M3)
                for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                and isinstance(m.weight._local_tensor, FP8AllGatherWeight)]
    stale = shards[0].scale.clone()
    opt.step()  # new weights: the precomputed scales no longer apply
    return after_precompute, in_step, [s.scale for s in shards], expected, stale, shards[0].scale_version, \
        shards[0].content_version()


def test_precomputed_scales_take_one_all_reduce_and_equal_the_whole_weights_scale():
    after_precompute, in_step, scales, expected, _, version, data_version = run_ranks(_scale_worker, 2)[0]
    assert after_precompute == 1  # one all-reduce for all 14 weights
    assert in_step == 0  # forward and backward gathers used them (loss all-reduces are not made here)
    assert len(scales) == 14
    for s, e in zip(scales, expected):
        assert torch.equal(s, e)
    assert version != data_version  # the optimizer step moved the shard past the precomputed scale


# ---- the amax of each shard from the optimizer step ---------------------------------------------------------------

_ROWS = (5, 1, 32, 3)  # on 2 ranks: uneven (3 + 2), one empty shard (1 + 0), even, uneven (2 + 1)


class _Linears(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, n, bias=False) for n in _ROWS)
        self.to(dtype)


class _NoRead:
    """Replaces ``tensor_amax`` wherever the FP8 all-gather could call it; counts the calls (the outermost: one
    implementation calls another) or raises."""

    MODULES = ("fp8coat.ops.fp8_gather", "fp8coat.quantization", "fp8coat.quantization.reference")

    def __init__(self, raise_: bool):
        import importlib

        self.raise_, self.calls, self._depth = raise_, 0, 0
        self._modules = [importlib.import_module(m) for m in self.MODULES]
        self._originals = [m.tensor_amax for m in self._modules]

    def __enter__(self):
        for module, original in zip(self._modules, self._originals):
            def patched(x, *args, _original=original, **kwargs):
                if self.raise_:
                    raise AssertionError("a weight shard was read")
                self.calls += self._depth == 0
                self._depth += 1
                try:
                    return _original(x, *args, **kwargs)
                finally:
                    self._depth -= 1

            module.tensor_amax = patched
        return self

    def __exit__(self, *exc):
        for module, original in zip(self._modules, self._originals):
            module.tensor_amax = original


def _recorded_amax_worker(rank: int, world: int, backend: str):
    from torch.distributed.tensor import distribute_tensor

    from fp8coat.nn.fp8_all_gather import fp8_all_gather_parameters
    from fp8coat.quantization import reference, tensor_amax

    out = {}
    for master, dtype in (("fp32", torch.float32), ("bf16-remainder", torch.bfloat16),
                          ("bf16-stochastic", torch.bfloat16), ("none", torch.bfloat16)):
        model = fp8coat.convert(_Linears(dtype), "fp8-linear")
        assert enable_fp8_all_gather(model) == len(_ROWS)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        params = fp8_all_gather_parameters(model)
        shards = [p._local_tensor for p in params]
        opt = fp8coat.AdamW(model.parameters(), lr=0.2, master_weights=master, backend=backend,
                            min_quantized_numel=0, record_amax_of=params)
        records = []
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:  # (the same full gradient on every rank: each takes its shard)
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen).to(dtype), p.device_mesh, p.placements)
            if step == 2 and rank == 0:
                with torch.no_grad():
                    shards[0]._data[1, 3] = float("nan")  # a NaN weight: its amax is +inf
            opt.step()
            for p, shard in zip(params, shards):
                amax, version = opt.recorded_amax(p)
                records.append((amax.clone(), reference.tensor_amax(shard._data), tensor_amax(shard._data),
                                version == shard.content_version(), tuple(shard.shape)))
        plans = bool(opt._plans)
        with _NoRead(raise_=True):  # every shard's amax comes from the step
            precompute_fp8_scales(model, opt)
        from_step = [s.scale for s in shards]
        expected = [scale_from_amax(reference.tensor_amax(p.full_tensor()), fp8coat.E4M3) for p in params]
        precompute_fp8_scales(model)
        read = [s.scale for s in shards]
        with torch.no_grad():
            shards[2].mul_(0.5)  # written after the step: its record is stale
        with _NoRead(raise_=False) as counter:
            precompute_fp8_scales(model, opt)
        stale_reads = counter.calls
        stale = [s.scale for s in shards]
        precompute_fp8_scales(model)
        out[master] = dict(records=records, plans=plans, from_step=from_step, expected=expected, read=read,
                           stale_reads=stale_reads, stale=stale, stale_read=[s.scale for s in shards])
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_precompute_takes_the_amax_the_optimizer_step_recorded(backend):
    """fp8coat.AdamW(record_amax_of=the gathered weights) records the amax of each new local shard, bit-equal to
    tensor_amax of the stored shard (every master mode; uneven, empty and NaN shards); precompute_fp8_scales(model,
    optimizer) then reads no shard and gives the scales of reading them; a shard written after the step is read."""
    for rank, out in enumerate(run_ranks(_recorded_amax_worker, 2, backend)):
        for master, res in out.items():
            what = f"{backend} {master} rank {rank}"
            assert res["plans"] == (backend == "triton"), what  # the Triton steps after the first: the fast path
            shapes = {shape for *_, shape in res["records"]}
            assert (0, 64) in shapes if rank == 1 else (1, 64) in shapes, what  # an empty shard on rank 1
            for i, (recorded, ref, dispatched, current, _) in enumerate(res["records"]):
                assert current, (what, i)
                assert torch.equal(recorded.view(torch.int32), ref.view(torch.int32)), (what, i, recorded, ref)
                assert torch.equal(recorded.view(torch.int32), dispatched.view(torch.int32)), (what, i)
            if rank == 0:
                assert res["records"][-len(_ROWS)][0] == float("inf"), what  # the NaN weight, last step
            for key in ("from_step", "read"):
                assert all(torch.equal(a, b) for a, b in zip(res[key], res["expected"], strict=True)), (what, key)
            assert res["stale_reads"] == 1, what  # only the shard written after the step
            assert all(torch.equal(a, b) for a, b in zip(res["stale"], res["stale_read"], strict=True)), what
            assert not torch.equal(res["stale"][2], res["read"][2]), what  # (the write changed that scale)


def _checkpoint_worker(rank: int, world: int, path: str, phase: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded(phase != "load_plain")
    opt = fp8coat.AdamW(model.parameters(), lr=1e-2, min_quantized_numel=0)

    def step(i):
        ids = _batch(rank, i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        precompute_fp8_scales(model)
        return loss.detach()

    if phase == "save":
        for i in range(2):
            step(i)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    else:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return [step(i) for i in (2, 3)], {n: p.full_tensor() for n, p in model.named_parameters()}


def test_checkpoints_hold_plain_tensors_and_resume_exactly(tmp_path):
    path = str(tmp_path / "ckpt")
    saved_losses, _ = run_ranks(_checkpoint_worker, 2, path, "save")[0]
    resumed_losses, resumed = run_ranks(_checkpoint_worker, 2, path, "load")[0]
    assert all(torch.equal(a, b) for a, b in zip(saved_losses, resumed_losses))
    # the checkpoint names no fp8coat class: a model without FP8 all-gather loads it (weights_only loading)
    _, plain = run_ranks(_checkpoint_worker, 2, path, "load_plain")[0]
    assert set(plain) == set(resumed)


# ---- the gathered weight inside one process ---------------------------------------------------------------------


def _gathered(w: torch.Tensor) -> torch.Tensor:
    from fp8coat.ops.fp8_gather import GatheredFP8Weight
    from fp8coat.quantization import quantize_per_tensor

    codes, scale = quantize_per_tensor(w.detach(), "e4m3")
    return torch.nn.Parameter(GatheredFP8Weight(codes, scale, w.dtype))


@pytest.mark.parametrize("n_weights", [1, 3])
def test_linears_on_gathered_weights_equal_quantizing_the_weights(n_weights):
    """Forward bit-equal; input gradient bit-equal for one weight (the transposed codes are the quantized transposed
    weight) and close for several (codes re-quantized under their joint scale); weight gradients bit-equal."""
    from fp8coat.ops.linear import linears

    gen = torch.Generator().manual_seed(n_weights)
    x = torch.randn(24, 64, generator=gen).bfloat16().requires_grad_()
    ws = [(torch.randn(n, 64, generator=gen) * s).bfloat16().requires_grad_()
          for n, s in zip((32, 16, 48), (1.0, 0.05, 3.0))][:n_weights]
    gws = [_gathered(w) for w in ws]
    dys = [torch.randn(24, w.shape[0], generator=gen).bfloat16() for w in ws]
    ref = linears(x, ws, emulate=True)
    xg = x.detach().clone().requires_grad_()
    out = linears(xg, gws, emulate=True)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    torch.autograd.backward(ref, dys)
    torch.autograd.backward(out, dys)
    for g, w in zip(gws, ws):
        assert type(g.grad) is torch.Tensor and g.grad.dtype == torch.bfloat16
        assert torch.equal(g.grad, w.grad)
    if n_weights == 1:
        assert torch.equal(xg.grad, x.grad)
    else:
        assert sqnr_db(x.grad, xg.grad) > 25


def test_other_uses_of_a_gathered_weight_see_its_dequantized_value():
    w = torch.randn(16, 32).bfloat16()
    g = _gathered(w)
    x = torch.randn(4, 32).bfloat16()
    expected = torch.nn.functional.linear(x, g.dequantized())
    assert torch.equal(torch.nn.functional.linear(x, g), expected)
    assert (g.dequantized().float() - w.float()).abs().max() <= w.float().abs().max() / 8  # E4M3: 3 mantissa bits


def _enable_after_sharding(rank: int, world: int) -> str:
    model = fp8coat.convert(_tiny_llama(), "coat").train()
    fully_shard(model)
    try:
        enable_fp8_all_gather(model)
    except ValueError as e:
        return str(e)
    return "no error"


def test_enabling_after_sharding_is_an_error():
    assert "before fully_shard" in run_ranks(_enable_after_sharding, 1)[0]
