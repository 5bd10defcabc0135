"""fp8coat.AdamW(record_amax_of=...): the amax of each named parameter's new weights, recorded by the step.

The recorded amax must equal ``tensor_amax`` of the weights as stored, bit for bit (torch and Triton paths, the
step-plan fast path included, every master mode, empty and ragged tensors, NaN and inf weights), come with the
version of the weights it belongs to, and change nothing else of the step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_bit_equal, device

import fp8coat
from fp8coat.ops.fp8_gather import FP8AllGatherWeight
from fp8coat.optim.layout import StateLayout, init_state
from fp8coat.optim.step_reference import StepScalars, adamw_step_reference
from fp8coat.quantization import reference, tensor_amax

SHAPES = [(8, 300), (3, 5, 128), (0, 64), (129,), (), (2, 256)]  # ragged, flat, empty, 1-d, 0-d
MODES = [  # (master_weights, parameter dtype)
    ("fp32", torch.float32),
    ("bf16-remainder", torch.bfloat16),
    ("bf16-stochastic", torch.bfloat16),
    ("none", torch.bfloat16),
    ("none", torch.float16),
]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 3).to(dtype).to(device())) for s in SHAPES]


def _set_grads(params, step: int):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype).to(device())


def _assert_records_match(opt, params, recorded, what):
    for i, p in enumerate(params):
        record = opt.recorded_amax(p)
        if not any(p is q for q in recorded):
            assert record is None, (what, i)
            continue
        amax, version = record
        assert amax.shape == () and amax.dtype == torch.float32 and amax.device == p.device, (what, i)
        assert_bit_equal(amax, reference.tensor_amax(p.detach()), f"{what} tensor {i}")
        assert_bit_equal(amax, tensor_amax(p.detach()), f"{what} tensor {i} (device backend)")
        assert version == p._version, (what, i)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES, ids=[f"{m}-{str(d)[6:]}" for m, d in MODES])
def test_recorded_amax_is_the_amax_of_the_stored_weights(backend, mode):
    """Steps 1 (general path) and 2-4 (the Triton backend's prepared plan); NaN, -inf and +inf written into
    three weights before step 3, and NaN gradients (skipped elements keep their weights) at step 4. eps = 0: the
    lanes of a tile past a tensor's end compute 0/0, which the amax must leave out."""
    master, dtype = mode
    params = _params(dtype)
    recorded = params[:4] + params[5:]  # all but the 0-d one
    opt = fp8coat.AdamW(params, lr=0.3, eps=0.0, weight_decay=0.1, master_weights=master, backend=backend,
                        min_quantized_numel=0, record_amax_of=recorded)
    assert all(opt.recorded_amax(p) is None for p in params)  # nothing recorded before a step
    plans = []
    for step in range(1, 5):
        _set_grads(params, step)
        if step == 3:
            with torch.no_grad():
                params[0].view(-1)[7] = float("nan")
                params[3][-1] = -float("inf")
                params[5][1, 3] = float("inf")
        if step == 4:
            params[1].grad.view(-1)[:5] = float("nan")
        opt.step()
        if backend == "triton":  # steps after the first take the fast path: the plan the first one prepared
            plans.append(opt._plans[0])
            assert plans[-1] is plans[0], step
        _assert_records_match(opt, params, recorded, f"{backend} {master} step {step}")
        if step >= 3:
            assert opt.recorded_amax(params[0])[0] == float("inf")  # NaN counts as +inf
            for p in (params[3], params[5]):  # (an inf written over a bf16 remainder joins to a finite master)
                assert opt.recorded_amax(p)[0] > 3e38
    assert opt.recorded_amax(params[2])[0] == 0.0  # empty tensor


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("master", ["bf16-remainder", "bf16-stochastic"])
def test_recording_changes_nothing_else(backend, master):
    """Parameters, states and the non-finite count are bit-identical with and without recording."""
    params_a = _params(torch.bfloat16, seed=1)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    kw = dict(lr=1e-2, master_weights=master, backend=backend, min_quantized_numel=0)
    opt_a = fp8coat.AdamW(params_a, **kw)
    opt_b = fp8coat.AdamW(params_b, record_amax_of=params_b[::2], **kw)
    for step in range(1, 4):
        _set_grads(params_a, step)
        _set_grads(params_b, step)
        params_a[0].grad[0, :3] = params_b[0].grad[0, :3] = float("nan")
        opt_a.step()
        opt_b.step()
        for i, (a, b) in enumerate(zip(params_a, params_b)):
            assert_bit_equal(a, b, f"param {i} step {step}")
            for key, value in opt_a.state[a].items():
                assert_bit_equal(value, opt_b.state[b][key], f"{key} {i} step {step}")
        assert int(opt_a.nonfinite_grad_count) == int(opt_b.nonfinite_grad_count) == 3 * step
    _assert_records_match(opt_b, params_b, params_b[::2], f"{backend} {master}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_write_after_the_step_changes_the_version(backend):
    params = _params(torch.bfloat16)
    opt = fp8coat.AdamW(params, lr=1e-2, backend=backend, min_quantized_numel=0, record_amax_of=params)
    _set_grads(params, 1)
    opt.step()
    amax, version = opt.recorded_amax(params[0])
    assert version == params[0]._version
    with torch.no_grad():
        params[0].mul_(2)
    assert opt.recorded_amax(params[0])[1] != params[0]._version  # stale: the caller must not use it
    _set_grads(params, 2)
    opt.step()  # the next step records anew
    _assert_records_match(opt, params, params, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weights_wrapped_for_fp8_all_gather_report_their_content_version(backend):
    """A parameter wrapping its data in :class:`FP8AllGatherWeight`: the optimizer writes the plain tensor inside;
    the version is the wrapper's ``content_version()``, and a write through the wrapper changes it."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(s, generator=g).bfloat16().to(device()) for s in ((24, 64), (5, 128))]
    params = [torch.nn.Parameter(FP8AllGatherWeight(d)) for d in data]
    opt = fp8coat.AdamW(params, lr=1e-2, backend=backend, min_quantized_numel=0, record_amax_of=params)
    for step in range(1, 4):
        for p, d in zip(params, data):
            p.grad = torch.randn(d.shape, generator=g).bfloat16().to(device())
        opt.step()
        for p, d in zip(params, data):
            amax, version = opt.recorded_amax(p)
            assert version == p.content_version(), step
            assert_bit_equal(amax, reference.tensor_amax(d), f"step {step}")
    with torch.no_grad():
        params[0].add_(1.0)  # through the wrapper
    assert opt.recorded_amax(params[0])[1] != params[0].content_version()


def test_step_params_records_too():
    """The per-parameter updates of ``step_params`` (``StepInBackward``) record as ``step`` does."""
    params = _params(torch.bfloat16)
    opt = fp8coat.AdamW(params, lr=1e-2, min_quantized_numel=0, record_amax_of=params[:2])
    _set_grads(params, 1)
    opt.step_params(params[:1], new_step=True)
    opt.step_params(params[1:], new_step=False)
    _assert_records_match(opt, params, params[:2], "step_params")


def test_record_amax_of_names_parameters_of_the_optimizer():
    params = _params(torch.float32)
    with pytest.raises(ValueError, match="record_amax_of"):
        fp8coat.AdamW(params[:2], record_amax_of=[params[3]])


@pytest.mark.parametrize("mode", MODES, ids=[f"{m}-{str(d)[6:]}" for m, d in MODES])
def test_fused_kernel_records_the_tensors_it_is_asked_to(mode):
    """``fused_adamw_step(record_amax=...)``: the slot of each recording tensor holds the reference's amax_out;
    the others stay 0; the slots start from 0 at every launch (weights that shrink record their new amax)."""
    from fp8coat.optim.step_triton import fused_adamw_step

    master, dtype = mode
    fmt = fp8coat.get_format
    layout = StateLayout(fmt("e4m3"), fmt("e4m3"), 128, True, master)
    params_a = [p.detach() for p in _params(dtype, seed=2)]
    params_b = [p.clone() for p in params_a]
    states_a = [init_state(p, layout) for p in params_a]
    states_b = copy.deepcopy(states_a)
    records = [i % 2 == 0 for i in range(len(params_a))]
    cache = None
    for step in range(1, 4):
        sc = StepScalars(lr=0.5 if step < 3 else 1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5 * step,
                         step=step)
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g).to(dtype).to(device()) for p in params_a]
        for s in states_a + states_b:
            s["step"] += 1
        for i, (p, gr, s) in enumerate(zip(params_a, grads, states_a)):
            out = torch.full((), -1.0, device=device())
            adamw_step_reference(p, gr, s, layout, sc, sr_key=10 * step + i, amax_out=out)
            assert_bit_equal(out, reference.tensor_amax(p), f"reference {i}")
        cache = fused_adamw_step(params_b, grads, states_b, layout, sc, seed=10 * step, cache=cache,
                                 record_amax=records)
        for i, (record, pb) in enumerate(zip(records, params_b)):
            got = cache.amax_slots[i]
            if record:
                assert_bit_equal(got, reference.tensor_amax(pb), f"step {step} tensor {i}")
            else:
                assert float(got) == 0.0
