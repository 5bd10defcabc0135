"""fp8coat.AdamW under what users do to a running optimizer: parameters zeroed from outside, non-finite and huge
gradients, parameters converted to another dtype, options changed in ``param_groups``, invalid hyper-parameters.

Each behaviour is checked on the torch reference and on the fused Triton step (the interpreter on CPU)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import assert_bit_equal, device

import fp8coat
from fp8coat.optim import state_codec
from fp8coat.optim.layout import init_state
from fp8coat.optim.master_weights import join_bf16_remainder, split_bf16_remainder

M_BOUND, V_BOUND = 2.0**63, 2.0**126  # the documented bounds of |m| and v
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
BACKENDS = ["torch", "triton"]


def _bf16_exact_randn(shape, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).bfloat16().float().to(device())


def _step_with(opt, params, grads):
    for p, g in zip(params, grads):
        if g.dtype != p.dtype and hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # mixed-precision gradients (e.g. bf16 grads of fp32 params)
        p.grad = g
    opt.step()


def _master(opt, p):
    """The fp32 value the optimizer holds for ``p`` (bf16 + remainder joined, or the parameter itself)."""
    s = opt.state[p]
    if "master_remainder" in s:
        return join_bf16_remainder(p.detach(), s["master_remainder"]).reshape(p.shape)
    return p.detach().float()


def _decoded(opt, p, key):
    s = opt.state[p]
    fmt = opt.layout_of(p).format_of(key)
    if fmt is None:
        return s[key].float()
    return state_codec.decode(s[key], s[key + "_absmax"], s.get(key + "_expo"), fmt, opt.layout_of(p).group_size)


# ---------------------------------------------------------------------------------------------------------------
# 1. bf16 parameters zeroed from outside (pruning, masking) keep training


def test_join_falls_back_to_the_parameter_where_the_joined_bits_are_not_finite():
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0]).bfloat16()
    rem = torch.tensor([0x8000 - 2**16, 0xFFFF - 2**16, 0x1234, 0x7FFF], dtype=torch.int16)
    out = join_bf16_remainder(zeros, rem)
    assert torch.isfinite(out).all()
    assert out[0].item() == 0.0 and math.copysign(1, out[1].item()) == -1 and out[1].item() == 0.0
    # below 0x8000 the join is the tiny value the remainder encodes (within half a bf16 ulp of 0)
    assert 0 < out[2].item() < 1e-40 and -1e-40 < out[3].item() < 0
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), float("inf")]).bfloat16()
    rem = torch.tensor([0x0001, 0x7FFF, 0x9000 - 2**16, 0x8000 - 2**16], dtype=torch.int16)
    out = join_bf16_remainder(specials, rem)
    assert out[0].item() == math.inf and out[1].item() == -math.inf and math.isnan(out[2].item())
    # inf over a remainder >= 0x8000 is the finite master that split rounds up to inf
    assert out[3].item() == torch.tensor(0x7F7F8000, dtype=torch.int32).view(torch.float32).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeroed_bf16_parameters_train_like_an_fp32_master_run(backend):
    """Zero elements of a bf16-remainder parameter after some steps (half get -0.0); the next 20 steps must move
    every zeroed element and equal, bit for bit, an fp32-master run zeroed at the same elements."""
    gen = torch.Generator().manual_seed(11)
    init = _bf16_exact_randn((16, 256), gen)
    p32 = torch.nn.Parameter(init.clone())
    p16 = torch.nn.Parameter(init.bfloat16())
    kw = dict(min_quantized_numel=0, backend=backend, **HYPER)
    o32 = fp8coat.AdamW([p32], master_weights="fp32", **kw)
    o16 = fp8coat.AdamW([p16], master_weights="bf16-remainder", **kw)
    for _ in range(4):
        g = _bf16_exact_randn(init.shape, gen)
        _step_with(o32, [p32], [g])
        _step_with(o16, [p16], [g.bfloat16()])
    mask = torch.rand(init.shape, generator=gen) < 0.5
    negative = mask & (torch.rand(init.shape, generator=gen) < 0.5)
    high_rem = (o16.state[p16]["master_remainder"].to(torch.int32) & 0x8000) != 0
    assert (mask & high_rem).sum() > 100, "the case that wrapped to NaN must be exercised"
    for p in (p32, p16):
        p.data[mask] = 0.0
        p.data[negative] = -0.0
    for step in range(20):
        g = _bf16_exact_randn(init.shape, gen)
        _step_with(o32, [p32], [g])
        _step_with(o16, [p16], [g.bfloat16()])
        assert_bit_equal(_master(o16, p16), p32.detach(), f"master, step {step}")
        assert_bit_equal(p16.detach(), split_bf16_remainder(p32.detach())[0], f"bf16 param, step {step}")
    assert torch.isfinite(p16.float()).all()
    assert (p16.detach()[mask] != 0).all(), f"{int((p16.detach()[mask] == 0).sum())} zeroed elements never moved"


# ---------------------------------------------------------------------------------------------------------------
# 3. non-finite and huge gradient elements

# (master mode, param dtype, grad dtype, moments: "dre" / "plain" FP8 or "fp32")
GRAD_CASES = [
    ("fp32", torch.float32, torch.float32, "dre"),
    ("fp32", torch.float32, torch.bfloat16, "plain"),
    ("fp32", torch.float32, torch.float32, "fp32"),
    ("bf16-remainder", torch.bfloat16, torch.bfloat16, "dre"),
    ("bf16-remainder", torch.bfloat16, torch.float32, "fp32"),
    ("bf16-stochastic", torch.bfloat16, torch.bfloat16, "plain"),
    ("none", torch.bfloat16, torch.bfloat16, "dre"),
    ("none", torch.float16, torch.float16, "fp32"),
]
# (row, col) of one special gradient value each, in different 128-groups of a (6, 256) parameter: three
# non-finite ones, then three finite but huge ones (fp16 gradients: huge for fp16)
POSITIONS = [(0, 3), (1, 130), (2, 7), (3, 200), (4, 10), (5, 255)]
NON_FINITE = 3


def _specials(g_dtype):
    huge = (6e4, 65504.0, -6e4) if g_dtype == torch.float16 else (1e30, 3e38, -6e20)
    return list(zip(POSITIONS, (float("nan"), float("inf"), float("-inf")) + huge))


def _grad_case_opts(case, backend):
    master, p_dtype, g_dtype, moments = case
    return dict(master_weights=master, backend=backend, expansion=moments != "plain",
                min_quantized_numel=10**9 if moments == "fp32" else 0, **HYPER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=["-".join(map(str, c)).replace("torch.", "") for c in GRAD_CASES])
def test_bad_gradient_elements_stay_local(case, backend):
    """A step where some gradient elements are NaN, ±inf, or finite but huge (1e30, 3e38, -6e20), against the
    same step with zeros there: every other element's parameter is bit-identical; NaN/±inf elements keep their
    parameter, master and moments and are counted; huge ones update and stay finite; no NaN or inf anywhere,
    then or in later steps. m and v of groups without a special element are bit-identical; in a group with a
    non-finite element the other elements differ only by the group's quantization."""
    master, p_dtype, g_dtype, moments = case
    specials = _specials(g_dtype)
    gen = torch.Generator().manual_seed(5)
    init = (torch.randn(6, 256, generator=gen) * 0.02).to(p_dtype).to(device())
    pa, pb = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa = fp8coat.AdamW([pa], **_grad_case_opts(case, backend))
    ob = fp8coat.AdamW([pb], **_grad_case_opts(case, backend))
    for _ in range(3):
        g = torch.randn(init.shape, generator=gen).to(g_dtype).to(device())
        _step_with(oa, [pa], [g])
        _step_with(ob, [pb], [g.clone()])
    before_p = pa.detach().clone()
    before_master = _master(oa, pa)
    before_m, before_v = _decoded(oa, pa, "exp_avg"), _decoded(oa, pa, "exp_avg_sq")
    before_state = copy.deepcopy(oa.state[pa])

    g = torch.randn(init.shape, generator=gen).to(g_dtype).to(device())
    ga, gb = g.clone(), g.clone()
    special = torch.zeros(init.shape, dtype=torch.bool)
    for (r, c), value in specials:
        ga[r, c] = value
        gb[r, c] = 0.0
        special[r, c] = True
    assert torch.isfinite(ga[3:].float()).all(), "huge values must stay finite in the gradient dtype"
    bad = special.clone()
    bad[3:] = False  # the non-finite ones
    _step_with(oa, [pa], [ga])
    _step_with(ob, [pb], [gb])

    assert_bit_equal(pa.detach()[~special], pb.detach()[~special], "other elements' parameters")
    assert_bit_equal(pa.detach()[bad], before_p[bad], "parameter of a NaN/inf element")
    assert_bit_equal(_master(oa, pa)[bad], before_master[bad], "master of a NaN/inf element")
    assert torch.isfinite(pa.detach().float()).all() and torch.isfinite(_master(oa, pa)).all()
    assert int(oa.nonfinite_grad_count) == NON_FINITE and int(ob.nonfinite_grad_count) == 0
    huge = special & ~bad
    assert (pa.detach()[huge] != before_p[huge]).all(), "huge finite gradients still update"
    step = (_master(oa, pa) - before_master)[huge].abs()
    assert (step < 10 * HYPER["lr"] + 0.01 * before_master[huge].abs()).all(), step

    m, v = _decoded(oa, pa, "exp_avg"), _decoded(oa, pa, "exp_avg_sq")
    assert torch.isfinite(m).all() and torch.isfinite(v).all()
    assert (m.abs() <= M_BOUND * 1.001).all() and (v <= V_BOUND * 1.001).all()
    sa, sb = oa.state[pa], ob.state[pb]
    if moments == "fp32":  # unquantized: exact
        for key, old, new in (("exp_avg", before_m, m), ("exp_avg_sq", before_v, v)):
            assert_bit_equal(new[bad], old[bad], f"{key} of a NaN/inf element")
            assert_bit_equal(sa[key][~special], sb[key][~special], f"{key} of other elements")
    else:
        group_of = torch.arange(256) // 128
        touched = torch.zeros(6, 2, dtype=torch.bool)
        for r, c in POSITIONS:
            touched[r, group_of[c]] = True
        for key, old, new in (("exp_avg", before_m, m), ("exp_avg_sq", before_v, v)):
            codes_a, codes_b = sa[key].view(torch.uint8), sb[key].view(torch.uint8)
            untouched = ~touched[:, group_of]
            assert torch.equal(codes_a[untouched], codes_b[untouched]), key
            assert torch.equal(sa[key + "_absmax"][~touched], sb[key + "_absmax"][~touched]), key
            ref = _decoded(ob, pb, key)
            for r, c in POSITIONS[:NON_FINITE]:
                group = group_of == group_of[c]
                scale = new[r, group].abs().max()
                # a skipped element keeps its value up to its group's new quantization (E4M3 / E5M2 rounding)
                assert (new[r, c] - old[r, c]).abs() <= 0.15 * old[r, c].abs() + 1e-3 * scale, (key, r, c)
                # the rest of its group: quantized against nearly the same group as without it
                cols = group & (torch.arange(256) != c)
                assert ((new[r, cols] - ref[r, cols]).abs() <= 0.15 * ref[r, cols].abs() + 1e-3 * scale).all()
        assert not torch.equal(before_state["exp_avg"], sa["exp_avg"])  # the step did update the states

    for _ in range(3):  # training goes on normally, the skipped elements move again
        g = torch.randn(init.shape, generator=gen).to(g_dtype).to(device())
        _step_with(oa, [pa], [g])
    assert torch.isfinite(pa.detach().float()).all()
    assert torch.isfinite(_decoded(oa, pa, "exp_avg")).all() and torch.isfinite(_decoded(oa, pa, "exp_avg_sq")).all()
    assert (pa.detach()[bad] != before_p[bad]).all()
    assert int(oa.nonfinite_grad_count) == NON_FINITE


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_gradients_never_overflow_the_moments(backend):
    """Gradients at the top of fp32's range, step after step and of both signs, in both lerp forms (β1 = 0.9
    and β1 = 0.3): m and v saturate at their bounds, nothing becomes NaN or inf, and the update stays of order
    lr."""
    for beta1 in (0.9, 0.3):
        gen = torch.Generator().manual_seed(2)
        p = torch.nn.Parameter(torch.randn(2, 128, generator=gen).to(device()))
        with pytest.warns(UserWarning, match="drift"):  # beta2 = 0.999 puts v's growth near fp32's top
            opt = fp8coat.AdamW([p], lr=1e-2, betas=(beta1, 0.999), min_quantized_numel=0, backend=backend)
        sign = 1.0
        for _ in range(6):
            g = torch.full((2, 128), 3.4e38 * sign)
            g[1] = torch.randn(128, generator=gen) * 1e25
            sign = -sign
            before = p.detach().clone()
            _step_with(opt, [p], [g.to(device())])
            assert torch.isfinite(p).all()
            assert ((p.detach() - before).abs() < 1.0).all()
            m, v = _decoded(opt, p, "exp_avg"), _decoded(opt, p, "exp_avg_sq")
            assert torch.isfinite(m).all() and torch.isfinite(v).all()
        assert int(opt.nonfinite_grad_count) == 0


def test_nonfinite_count_is_a_device_tensor_and_step_in_backward_skips_too():
    model = torch.nn.Linear(64, 32).to(device())
    opt = fp8coat.AdamW(model.parameters(), min_quantized_numel=0, **HYPER)
    count = opt.nonfinite_grad_count
    assert count.dtype == torch.int64 and count.dim() == 0 and count.device == model.weight.device
    sib = fp8coat.StepInBackward(opt)
    x = torch.randn(4, 64, device=device())
    x[0, 0] = float("nan")  # column 0 of the weight's gradient is NaN; the bias gradient stays finite
    before = model.weight.detach().clone()
    model(x).sum().backward()
    sib.remove()
    nan_cols = ~torch.isfinite(x).all(0)
    assert int(count) == 32 * int(nan_cols.sum())
    assert torch.equal(model.weight.detach()[:, nan_cols], before[:, nan_cols])
    assert (model.weight.detach()[:, ~nan_cols] != before[:, ~nan_cols]).all()
    assert opt.nonfinite_grad_count is count


# ---------------------------------------------------------------------------------------------------------------
# 2. parameters converted to another dtype or device after their state exists


def _linear(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(256, 64).to(device=device(), dtype=dtype)


def _grads_for(model, gen):
    return [_bf16_exact_randn(p.shape, gen) for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_remainder_model_converted_to_float32_continues_with_the_exact_master(backend):
    """model.float() after steps with bf16 + remainder: the exact fp32 master is written into the parameters and
    training continues as the fp32-master run would, bit for bit; the state dict of the converted optimizer
    loads into a fresh one and continues identically too."""
    gen = torch.Generator().manual_seed(3)
    m16, m32 = _linear(torch.bfloat16), _linear(torch.bfloat16).float()
    kw = dict(min_quantized_numel=0, backend=backend, **HYPER)
    o16 = fp8coat.AdamW(m16.parameters(), **kw)
    o32 = fp8coat.AdamW(m32.parameters(), **kw)
    for _ in range(3):
        g = _grads_for(m16, gen)
        _step_with(o16, list(m16.parameters()), [x.bfloat16() for x in g])
        _step_with(o32, list(m32.parameters()), g)
    m16.float()
    for step in range(3):
        g = _grads_for(m16, gen)
        _step_with(o16, list(m16.parameters()), g)
        _step_with(o32, list(m32.parameters()), g)
        for a, b in zip(m16.parameters(), m32.parameters()):
            assert a.dtype == torch.float32
            assert_bit_equal(a.detach(), b.detach(), f"step {step}")
    for p in m16.parameters():
        assert "master_remainder" not in o16.state[p] and o16.layout_of(p).master == "fp32"
    buf = io.BytesIO()
    torch.save(o16.state_dict(), buf)
    buf.seek(0)
    m_new = copy.deepcopy(m16)
    o_new = fp8coat.AdamW(m_new.parameters(), **kw)
    o_new.load_state_dict(torch.load(buf, weights_only=True))
    g = _grads_for(m16, gen)
    for model, opt in ((m16, o16), (m_new, o_new)):
        _step_with(opt, list(model.parameters()), g)
    for a, b in zip(m16.parameters(), m_new.parameters()):
        assert_bit_equal(a.detach(), b.detach(), "after a state-dict round trip")


def test_float32_elements_written_after_the_conversion_are_kept():
    """Only elements that still hold a bf16 value get their remainder joined; others were written by the user."""
    p = torch.nn.Parameter(torch.randn(4, 256).bfloat16())
    opt = fp8coat.AdamW([p], min_quantized_numel=0, **HYPER)
    _step_with(opt, [p], [torch.randn(4, 256).bfloat16()])
    master = _master(opt, p)
    p.data = p.data.float()
    p.data[0, :5] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.7])  # not bf16 values
    before = p.detach().clone()
    opt.state_dict()  # brings the state up to date without a step
    assert_bit_equal(p.detach()[1:], master[1:], "joined master")
    assert_bit_equal(p.detach()[0, :5], before[0, :5], "user-written values")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conversion", ["bf16-remainder->float16", "fp32->bfloat16", "fp32->float16"])
def test_conversions_that_lose_the_exact_master_raise(conversion, backend):
    src, dst = conversion.split("->")
    dtype = torch.bfloat16 if src == "bf16-remainder" else torch.float32
    model = _linear(dtype)
    opt = fp8coat.AdamW(model.parameters(), min_quantized_numel=0, backend=backend, **HYPER)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        _step_with(opt, list(model.parameters()), [g.to(dtype) for g in _grads_for(model, gen)])
    before = [p.detach().clone() for p in model.parameters()]
    model.to(getattr(torch, dst))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old_name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\.params\[0\].*{old_name}.*{dst}.*") as info:
        opt.step()
    assert "create a new optimizer" in str(info.value)
    for p, b in zip(model.parameters(), before):  # nothing was updated
        assert torch.equal(p.detach(), b.to(p.dtype))
    with pytest.raises(ValueError, match="changed dtype"):
        opt.state_dict()


def test_explicit_master_mode_that_rejects_the_new_dtype_raises():
    model = _linear(torch.bfloat16)
    opt = fp8coat.AdamW(model.parameters(), master_weights="bf16-remainder", min_quantized_numel=0, **HYPER)
    gen = torch.Generator().manual_seed(0)
    _step_with(opt, list(model.parameters()), [g.bfloat16() for g in _grads_for(model, gen)])
    model.float()
    with pytest.raises(ValueError, match=r"needs bfloat16.*float32.*was torch.bfloat16.*master_weights"):
        _step_with(opt, list(model.parameters()), _grads_for(model, gen))
    opt.param_groups[0]["master_weights"] = "auto"  # what the message says to do
    _step_with(opt, list(model.parameters()), _grads_for(model, gen))
    assert all(opt.layout_of(p).master == "fp32" for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_mode_follows_any_float_dtype(backend):
    """master_weights='none': bf16 -> fp16 -> fp32 between steps; each step equals a fresh reference step from
    the same moments in the new dtype (the parameter is read in its own dtype, never as another's bits)."""
    from fp8coat.optim.step_reference import StepScalars, adamw_step_reference

    model = _linear(torch.bfloat16)
    opt = fp8coat.AdamW(model.parameters(), master_weights="none", min_quantized_numel=0, expansion=False,
                        backend=backend, **HYPER)
    gen = torch.Generator().manual_seed(0)
    _step_with(opt, list(model.parameters()), [g.bfloat16() for g in _grads_for(model, gen)])
    for dtype in (torch.float16, torch.float32):
        model.to(dtype)
        grads = [g.to(dtype) for g in _grads_for(model, gen)]
        expected = []
        for p, g in zip(model.parameters(), grads):
            q, s = p.detach().clone(), copy.deepcopy(opt.state[p])
            s["step"] += 1
            sc = StepScalars(lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=int(s["step"]))
            adamw_step_reference(q, g, s, opt.layout_of(p), sc)
            expected.append(q)
        _step_with(opt, list(model.parameters()), grads)
        for p, e in zip(model.parameters(), expected):
            assert p.dtype == dtype
            assert_bit_equal(p.detach(), e, str(dtype))


def test_step_in_backward_converts_like_the_usual_step():
    """StepInBackward's per-parameter updates go through the same checks: after model.float() they continue
    with the exact fp32 master, bit-identical to the usual step."""
    gen = torch.Generator().manual_seed(8)
    ref, model = _linear(torch.bfloat16), _linear(torch.bfloat16)
    o_ref = fp8coat.AdamW(ref.parameters(), min_quantized_numel=0, **HYPER)
    o = fp8coat.AdamW(model.parameters(), min_quantized_numel=0, **HYPER)
    sib = fp8coat.StepInBackward(o)
    xs = [torch.randn(8, 256, generator=gen).to(device()) for _ in range(4)]
    for i, x in enumerate(xs):
        if i == 2:
            ref.float()
            model.float()
        dtype = next(model.parameters()).dtype
        ref(x.to(dtype)).square().mean().backward()
        o_ref.step()
        o_ref.zero_grad(set_to_none=True)
        model(x.to(dtype)).square().mean().backward()
        for a, b in zip(ref.parameters(), model.parameters()):
            assert_bit_equal(a.detach(), b.detach(), f"step {i}")
    sib.remove()
    assert all(o.layout_of(p).master == "fp32" for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_outside_the_fused_step_take_the_torch_path(backend):
    """master_weights='none' accepts float64 parameters; the Triton backend has no float64 step and must fall
    back to the reference instead of failing."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, 256, generator=gen, dtype=torch.float64).to(device()))
    q = torch.nn.Parameter(p.detach().clone())
    kw = dict(master_weights="none", min_quantized_numel=0, **HYPER)
    o_p, o_q = fp8coat.AdamW([p], backend=backend, **kw), fp8coat.AdamW([q], backend="torch", **kw)
    for _ in range(2):
        g = torch.randn(4, 256, generator=gen, dtype=torch.float64).to(device())
        _step_with(o_p, [p], [g])
        _step_with(o_q, [q], [g.clone()])
    assert p.dtype == torch.float64
    assert_bit_equal(p.detach(), q.detach(), "float64")


def test_device_change_moves_the_state():
    """A state recorded for another device follows its parameter (on a CPU-only machine: simulated by editing the
    record; tests/test_gpu.py is where a real move belongs)."""
    import dataclasses

    p = torch.nn.Parameter(torch.randn(4, 256))
    opt = fp8coat.AdamW([p], min_quantized_numel=0, **HYPER)
    _step_with(opt, [p], [torch.randn(4, 256)])
    opt._specs[p] = dataclasses.replace(opt._specs[p], device=torch.device("meta"))
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].to("meta")
    with pytest.raises(NotImplementedError):  # a meta tensor cannot move back: proves the move is attempted
        _step_with(opt, [p], [torch.randn(4, 256)])


def test_load_state_dict_into_float32_parameters_restores_the_exact_master():
    """A checkpoint of a bf16-remainder run loads into a float32 model (built from the bf16 weights): at the next
    step the fp32 master is rebuilt, and the run equals the fp32-master twin bit for bit."""
    gen = torch.Generator().manual_seed(4)
    m16, m32 = _linear(torch.bfloat16), _linear(torch.bfloat16).float()
    kw = dict(min_quantized_numel=0, **HYPER)
    o16, o32 = fp8coat.AdamW(m16.parameters(), **kw), fp8coat.AdamW(m32.parameters(), **kw)
    for _ in range(3):
        g = _grads_for(m16, gen)
        _step_with(o16, list(m16.parameters()), [x.bfloat16() for x in g])
        _step_with(o32, list(m32.parameters()), g)
    sd = o16.state_dict()
    assert {state["param_dtype"] for state in sd["state"].values()} == {"bfloat16"}
    loaded = _linear(torch.float32, seed=9)
    loaded.load_state_dict(m16.state_dict())  # bf16 weights upcast exactly
    opt = fp8coat.AdamW(loaded.parameters(), **kw)
    opt.load_state_dict(sd)
    g = _grads_for(m16, gen)
    _step_with(opt, list(loaded.parameters()), g)
    _step_with(o32, list(m32.parameters()), g)
    for a, b in zip(loaded.parameters(), m32.parameters()):
        assert_bit_equal(a.detach(), b.detach(), "loaded into float32")
    # a checkpoint whose exact master cannot follow raises at load
    sd32 = o32.state_dict()
    with pytest.raises(ValueError, match="changed dtype from torch.float32 to torch.bfloat16"):
        fp8coat.AdamW(_linear(torch.bfloat16).parameters(), **kw).load_state_dict(sd32)


# ---------------------------------------------------------------------------------------------------------------
# 4. options changed in param_groups after the first step; invalid values


OPTION_CHANGES = [
    ("group_size", 64), ("expansion", False), ("m_format", "e5m2"), ("v_format", "e5m2"),
    ("min_quantized_numel", 10**9), ("master_weights", "none"),
]


@pytest.mark.parametrize("key,value", OPTION_CHANGES, ids=[k for k, _ in OPTION_CHANGES])
def test_changed_options_convert_the_state(key, value):
    """The state takes the new layout (dtypes and shapes of a fresh state with the new options), the moments keep
    their values up to the new quantization, and the next steps use the new layout; state_dict works after."""
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(8, 256, generator=gen).bfloat16())
    opt = fp8coat.AdamW([p], min_quantized_numel=0, **HYPER)
    for _ in range(3):
        _step_with(opt, [p], [torch.randn(8, 256, generator=gen).bfloat16()])
    m_before, v_before = _decoded(opt, p, "exp_avg"), _decoded(opt, p, "exp_avg_sq")
    opt.param_groups[0][key] = value
    sd = opt.state_dict()  # converts now (a step would too)
    fresh = fp8coat.AdamW([torch.nn.Parameter(p.detach().clone())], **{**HYPER, "min_quantized_numel": 0, key: value})
    expected = init_state(p, fresh.layout_of(fresh.param_groups[0]["params"][0]))
    assert sorted(opt.state[p]) == sorted(expected)
    for k, ref in expected.items():
        assert opt.state[p][k].dtype == ref.dtype and opt.state[p][k].shape == ref.shape, k
    for old, k in ((m_before, "exp_avg"), (v_before, "exp_avg_sq")):
        new = _decoded(opt, p, k)
        scale = old.abs().amax(-1, keepdim=True)
        assert ((new - old).abs() <= 0.15 * scale).all(), k
    for _ in range(2):
        _step_with(opt, [p], [torch.randn(8, 256, generator=gen).bfloat16()])
    assert torch.isfinite(p.float()).all()
    other = fp8coat.AdamW([torch.nn.Parameter(p.detach().clone())], min_quantized_numel=0, **HYPER)
    other.load_state_dict(sd)
    assert sorted(other.state[other.param_groups[0]["params"][0]]) == sorted(expected)


def test_changed_options_reach_the_prepared_fused_plan():
    """With the fused step's prepared plan in place (Triton, interpreter), a new group_size still converts."""
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(4, 256, generator=gen).to(device()))
    opt = fp8coat.AdamW([p], min_quantized_numel=0, backend="triton", **HYPER)
    for _ in range(2):
        _step_with(opt, [p], [torch.randn(4, 256, generator=gen).to(device())])
    assert 0 in opt._plans
    opt.param_groups[0]["group_size"] = 64
    _step_with(opt, [p], [torch.randn(4, 256, generator=gen).to(device())])
    assert opt.state[p]["exp_avg_absmax"].shape == (4, 4) and opt.layout_of(p).group_size == 64
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("key,value,match", [
    ("group_size", 3, "group_size"), ("m_format", "e9", "m_format"), ("v_format", "int8", "v_format"),
    ("expansion", "yes", "expansion"), ("min_quantized_numel", -1, "min_quantized_numel"),
    ("master_weights", "fp64", "master_weights"), ("lr", float("inf"), "learning rate"),
    ("lr", float("nan"), "learning rate"), ("lr", -1e-3, "learning rate"), ("eps", float("inf"), "eps"),
    ("weight_decay", float("nan"), "weight_decay"), ("betas", (0.9, 1.0), "betas"),
])
def test_invalid_values_set_in_a_group_raise_before_the_step(key, value, match):
    p = torch.nn.Parameter(torch.randn(4, 256))
    opt = fp8coat.AdamW([p], min_quantized_numel=0, **HYPER)
    _step_with(opt, [p], [torch.randn(4, 256)])
    opt.param_groups[0][key] = value
    before = p.detach().clone()
    with pytest.raises(ValueError, match=match):
        _step_with(opt, [p], [torch.randn(4, 256)])
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1.0, torch.tensor(float("inf"))])
def test_invalid_lr_is_rejected_at_construction(lr):
    with pytest.raises(ValueError, match="learning rate"):
        fp8coat.AdamW([torch.nn.Parameter(torch.randn(4, 4))], lr=lr)


def test_triton_backend_with_cpu_parameters_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = fp8coat.AdamW([p], backend="triton")
    p.grad = torch.randn(64, 64)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        opt.step()


@pytest.mark.parametrize("shape", [(0,), (0, 128), (128, 0), (0, 0), (64, 0, 256)])
@pytest.mark.parametrize("mqn", [0, 4096])
def test_empty_parameters_step_and_round_trip(shape, mqn):
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
    p.grad = torch.zeros_like(p)
    opt = fp8coat.AdamW([p], min_quantized_numel=mqn)
    opt.step()
    again = fp8coat.AdamW([p], min_quantized_numel=mqn)
    again.load_state_dict(opt.state_dict())
    again.step()
    assert p.shape == shape


@pytest.mark.parametrize("new_shape", [(128, 64), (32, 256), (64, 64)])
def test_a_parameter_that_changes_shape_is_refused(new_shape):
    """Moments are laid out per row: a reshaped parameter (same or other element count) must not step silently
    with the old layout."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    opt = fp8coat.AdamW([p], lr=1e-2)
    for _ in range(2):  # the second step runs through the prepared plan
        p.grad = torch.randn_like(p)
        opt.step()
    n = math.prod(new_shape)
    p.data = p.data.reshape(-1)[:n].reshape(new_shape) if n <= p.numel() else torch.randn(new_shape).bfloat16()
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="cannot change shape"):
        opt.step()


def test_a_nan_master_stays_nan_in_bf16_whatever_its_payload():
    """CUDA's arithmetic NaN is 0x7FFFFFFF: rounding its low half up would carry into the sign bit and store -0.0
    (a NaN weight silently turned into zero). Every NaN payload, of either sign, rounds to a bf16 NaN of the same
    sign, with the remainder 0 and under stochastic rounding too."""
    from fp8coat.optim.master_weights import join_bf16_remainder, split_bf16_remainder, stochastic_round_bf16

    patterns = torch.tensor([0x7FFFFFFF, 0x7FC00000, 0x7F800001, 0x7FBFFFFF, -1, -0x00400000, -0x007FFFFF],
                            dtype=torch.int64)
    p32 = torch.where(patterns >= 2**31, patterns - 2**32, patterns).to(torch.int32).view(torch.float32)
    assert torch.isnan(p32).all()
    hi, lo = split_bf16_remainder(p32)
    assert torch.isnan(hi).all() and (lo == 0).all()
    assert torch.equal(torch.signbit(hi), torch.signbit(p32))
    assert torch.isnan(join_bf16_remainder(hi, lo)).all()
    for rnd in (torch.zeros(7, dtype=torch.int64), torch.full((7,), 0xFFFF, dtype=torch.int64)):
        out = stochastic_round_bf16(p32, rnd)
        assert torch.isnan(out).all() and torch.equal(torch.signbit(out), torch.signbit(p32))
    finite = torch.tensor([1.0, -3.5e38, 3.3e38, 0.0, -0.0, 1e-40])  # unchanged behaviour elsewhere
    hi_f, lo_f = split_bf16_remainder(finite)
    assert torch.equal(join_bf16_remainder(hi_f, lo_f).view(torch.int32), finite.view(torch.int32))
