"""FP8-saving activations (fp8coat.ops.activations): torch reference vs Triton, numerics vs fp32 autograd, what
autograd saves, torch.compile.

Backend tolerance. The saved FP8 tensors and scales must be bit-identical. Outputs and gradients may differ where
the backends' exp/erf differ in the last bit; an element passes when

    |triton - torch| <= ulp_out(|torch|) + UNITS · 2^-24 · m

with ulp_out = 0 for fp32 outputs (else eps·|v|, at least the smallest subnormal of the output dtype) and m the
magnitude of the fp32 computation (the sum of the absolute values of the terms that can cancel; see ``_mags``).
UNITS = 16. Measured worst case, CPU (Triton interpreter / numpy exp vs torch): 6.2 units (SwiGLU d_up, fp32),
i.e. <= 3.1 fp32 ulp of the result where nothing cancels; the 16-bit outputs differ in < 0.1% of elements, by
one ulp of the output dtype (erf-GELU: plus < 0.5 units of its erf cancellation near Φ -> 0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import adversarial, assert_bit_equal, device, sqnr_db

from fp8coat.ops import activations as act
from fp8coat.ops import geglu, gelu, quick_gelu, silu, swiglu
from fp8coat.quantization.reference import dequantize_per_group, quantize_per_group

pytestmark = [
    # the interpreter's numpy exp overflows to inf on purpose (silu/gelu of large |x|)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

UNITS = 16

# name -> (public call, gated, fp64 torch function f(x) used as ground truth)
OPS = {
    "swiglu": (lambda x, u, **kw: swiglu(x, u, **kw), True, F.silu),
    "geglu": (lambda x, u, **kw: geglu(x, u, "none", **kw), True, F.gelu),
    "geglu_tanh": (lambda x, u, **kw: geglu(x, u, "tanh", **kw), True, lambda t: F.gelu(t, approximate="tanh")),
    "silu": (lambda x, **kw: silu(x, **kw), False, F.silu),
    "gelu": (lambda x, **kw: gelu(x, **kw), False, F.gelu),
    "gelu_tanh": (lambda x, **kw: gelu(x, "tanh", **kw), False, lambda t: F.gelu(t, approximate="tanh")),
    "quick_gelu": (lambda x, **kw: quick_gelu(x, **kw), False, lambda t: t * torch.sigmoid(1.702 * t)),
}


def _mags(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 magnitudes (m_f, m_f') of the fp32 evaluation of f(x) and f'(x) (see the module docstring)."""
    x = x.double()
    if name in ("swiglu", "silu"):
        s = torch.sigmoid(x)
        return (x * s).abs(), s * (1 + x.abs())  # f' = s·(1 + x·(1 - s)): 1 - s and the sum can cancel
    if name == "quick_gelu":
        # s = σ(z), z = fp32(1.702)·x rounded: exp(-z) moves by |z| units, scaled by s·(1 - s); f' = s·(1 + z·(1 - s))
        # can cancel, and its error from s grows with 1 + |z|
        z = 1.702 * x
        s = torch.sigmoid(z)
        return x.abs() * s * (1 + z.abs() * (1 - s)), s * (1 + z.abs()) * (1 + z.abs() * (1 - s))
    if name in ("geglu", "gelu"):
        phi = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return x.abs(), 1 + x.abs() * phi  # Φ = 0.5·(1 + erf): an absolute error of erf's ulp near ±1
    # s = σ(z2): the rounding of z2 = K2·(x + C·x³) moves exp(-z2) by |z2| units, scaled by s·(1 - s)
    k2 = 2 * math.sqrt(2 / math.pi)
    z2 = k2 * (x + 0.044715 * x**3)
    s = torch.sigmoid(z2)
    xc = x.clamp(-9, 9)
    z2c = k2 * (xc + 0.044715 * xc**3)
    sc = torch.sigmoid(z2c)
    m_fp = (sc + xc.abs() * sc * (1 - sc) * k2 * (1 + 3 * 0.044715 * xc * xc)) * (1 + z2c.abs())
    return x.abs() * s * (1 + z2.abs() * (1 - s)), m_fp


def _assert_close(ref: torch.Tensor, got: torch.Tensor, m: torch.Tensor, what: str) -> None:
    assert ref.shape == got.shape and ref.dtype == got.dtype, what
    a, b = ref.double(), got.double()
    fin_a, fin_b = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fin_a, fin_b), f"{what}: finite positions differ"
    assert_bit_equal(torch.where(fin_a, 0.0, a), torch.where(fin_b, 0.0, b), f"{what} (non-finite values)")
    fi = torch.finfo(ref.dtype)
    ulp = 0.0 if ref.dtype == torch.float32 else torch.clamp(fi.eps * a.abs(), min=fi.tiny * fi.eps)
    tol = ulp + UNITS * 2.0**-24 * m.double() + 2.0**-126
    err = torch.where(fin_a, (a - b).abs(), 0.0)
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements out of tolerance, worst "
                           f"{float((err / tol).max()):.2f}x tol")


def _run(name: str, inputs: list, dy: torch.Tensor, **kw):
    """Forward + backward through the public op -> (out, saved tensors, grads)."""
    call, _gated, _ = OPS[name]
    leaves = [t.detach().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = call(*leaves, **kw)
    out.backward(dy)
    return out.detach(), saved, [t.grad for t in leaves]


def _compare_backends(name: str, inputs: list, dy: torch.Tensor, group_size: int = 16):
    """Run both backends, check saved bit-exactness and the tolerance; returns the torch results."""
    gated = OPS[name][1]
    out_r, saved_r, grads_r = _run(name, inputs, dy, group_size=group_size, backend="torch")
    out_t, saved_t, grads_t = _run(name, inputs, dy, group_size=group_size, backend="triton")
    assert len(saved_r) == len(saved_t) == (4 if gated else 2)
    for i, (a, b) in enumerate(zip(saved_r, saved_t)):
        assert_bit_equal(a, b, f"{name} saved[{i}]")
    x = inputs[0]
    mf, _ = _mags(x, name)
    u_abs = inputs[1].double().abs() if gated else 1.0
    _assert_close(out_r, out_t, mf * u_abs, f"{name} out")
    xd = dequantize_per_group(saved_r[0], saved_r[1], group_size)
    mf_d, mfp_d = _mags(xd, name)
    ud = dequantize_per_group(saved_r[2], saved_r[3], group_size).double().abs() if gated else 1.0
    dy_abs = dy.double().abs()
    _assert_close(grads_r[0], grads_t[0], dy_abs * ud * mfp_d, f"{name} d_x")
    if gated:
        _assert_close(grads_r[1], grads_t[1], dy_abs * mf_d, f"{name} d_up")
    return out_r, saved_r, grads_r


def _inputs(name: str, shape, dtype, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    n = 2 if OPS[name][1] else 1
    xs = [(torch.randn(shape, generator=g) * (scale if i == 0 else 1.0)).to(dtype=dtype, device=device())
          for i in range(n)]
    dy = torch.randn(shape, generator=g).to(dtype=dtype, device=device())
    return xs, dy


# ---------------------------------------------------------------------------------------------------------------
# torch reference vs Triton


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_backends_match(name, dtype):
    for shape in [(37, 1000), (3, 16), (33, 70), (2, 5, 129)]:
        inputs, dy = _inputs(name, shape, dtype, seed=sum(shape))
        _compare_backends(name, inputs, dy)


@pytest.mark.parametrize("name", ["swiglu", "gelu_tanh", "quick_gelu"])
def test_backends_match_wide_range(name):
    # magnitudes 1e-3..1e2 (exp overflow, sigmoid saturation, the clamp of the tanh derivative, erf -> ±1)
    for scale, dtype in [(0.01, torch.bfloat16), (30.0, torch.float32), (100.0, torch.bfloat16)]:
        inputs, dy = _inputs(name, (16, 300), dtype, seed=7, scale=scale)
        _compare_backends(name, inputs, dy)


@pytest.mark.parametrize("name", ["swiglu", "gelu", "silu"])
def test_backends_match_layouts(name):
    gated = OPS[name][1]
    g = torch.Generator().manual_seed(3)
    # transposed (stride (1, N)), a strided slice, a 3-D view with a non-collapsible leading layout
    base = [torch.randn(96, 40, generator=g).to(device=device(), dtype=torch.bfloat16) for _ in range(3)]
    cases = [[t.t() for t in base], [t[::2, 3:37] for t in base], [t.reshape(4, 24, 40).transpose(0, 1) for t in base]]
    for ts in cases:
        inputs, dy = ts[: 2 if gated else 1], ts[2]
        assert not inputs[0].is_contiguous()
        _compare_backends(name, inputs, dy)
    # the dy that autograd gives for out.sum() is an expanded (stride-0) tensor
    x = base[0][:, :33]
    for backend in ("torch", "triton"):
        leaves = [x.detach().clone().requires_grad_() for _ in range(2 if gated else 1)]
        OPS[name][0](*leaves, backend=backend).float().sum().backward()
        if backend == "torch":
            ref = [t.grad for t in leaves]
        else:
            for a, b in zip(ref, [t.grad for t in leaves]):
                torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 128])
def test_backends_match_group_sizes(group_size):
    for name in ("swiglu", "gelu"):
        inputs, dy = _inputs(name, (9, 300), torch.bfloat16, seed=group_size)
        _, saved, _ = _compare_backends(name, inputs, dy, group_size=group_size)
        q, s = quantize_per_group(inputs[0], "e4m3", group_size)
        assert_bit_equal(saved[0], q)
        assert_bit_equal(saved[1], s)
        assert saved[1].shape == (9, -(-300 // group_size))


@pytest.mark.parametrize("shape", [(0, 32), (4, 0), (2, 0, 16), (0,)])
def test_empty(shape):
    for name in OPS:
        inputs, dy = _inputs(name, shape, torch.bfloat16)
        for backend in ("torch", "triton"):
            out, saved, grads = _run(name, inputs, dy, backend=backend)
            assert out.shape == shape and all(g.shape == shape for g in grads)
            assert saved[1].shape == (*shape[:-1], -(-shape[-1] // 16))


@pytest.mark.parametrize("name", ["swiglu", "geglu_tanh", "gelu", "silu", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adversarial_inputs(name, dtype):
    """Zeros, fp32 subnormals, tiny and huge (|x| <= 1e19, within bf16 range) values, ±inf and NaN.

    Non-finite inputs stay confined: the output is non-finite exactly where an input element is, and a gradient
    is non-finite exactly in the 1×16 groups (of the row) whose saved input holds inf/NaN (those dequantize to
    NaN). Everything else is finite and matches between backends.
    """
    gated = OPS[name][1]
    shape = (6, 200)
    inputs = []
    for i in range(2 if gated else 1):
        x = adversarial(shape, seed=11 + i)
        x = torch.where(torch.isfinite(x), x.clamp(-1e19, 1e19), x)
        x[i, :16] = 0.0  # an all-zero group
        inputs.append(x.to(dtype=dtype, device=device()))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5)).clamp(-1, 1).to(dtype=dtype, device=device())
    out, _saved, grads = _compare_backends(name, inputs, dy)

    nonfinite_in = ~torch.isfinite(inputs[0])
    if gated:
        nonfinite_in |= ~torch.isfinite(inputs[1])
    assert torch.equal(~torch.isfinite(out), nonfinite_in)

    def poisoned(x):  # 1×16 groups holding inf/NaN, broadcast back to elements
        bad = (~torch.isfinite(x)).float()
        bad = F.pad(bad, (0, (-x.shape[-1]) % 16)).reshape(*x.shape[:-1], -1, 16).amax(-1)
        return bad.repeat_interleave(16, -1)[..., : x.shape[-1]].bool()

    px = poisoned(inputs[0])
    assert px.any() and not px.all()
    pu = poisoned(inputs[1]) if gated else torch.zeros_like(px)
    assert torch.isnan(grads[0][px | pu]).all()
    assert torch.isfinite(grads[0][~(px | pu)]).all()
    if gated:
        assert torch.isnan(grads[1][px]).all()
        assert torch.isfinite(grads[1][~px]).all()


# ---------------------------------------------------------------------------------------------------------------
# numerics vs fp32 autograd of the unquantized op


@pytest.mark.parametrize("name", list(OPS))
def test_sqnr_vs_fp32_autograd(name):
    """Realistic bf16 inputs (LLM MLP pre-activations ~ N(0, 1.5²), up ~ N(0, 1)); the reference is fp32 torch
    autograd of F.silu(g)·u etc. on fp32 copies. Measured (dB): outputs 55.5-56.2 (bf16 rounding only: the
    forward uses the original inputs); gradients (FP8 E4M3 saved inputs) of gate / up 32.4 / 31.7 (swiglu),
    32.5 / 32.1 (geglu, both variants), of x 41.5 (silu), 41.8 (gelu, both variants) and 43.0 (quick_gelu)."""
    _, gated, fn = OPS[name]
    inputs, dy = _inputs(name, (256, 512), torch.bfloat16, seed=1, scale=1.5)
    out, _, grads = _run(name, inputs, dy)
    leaves = [t.float().requires_grad_() for t in inputs]
    ref = fn(leaves[0]) * leaves[1] if gated else fn(leaves[0])
    ref.backward(dy.float())
    s_out = sqnr_db(ref.detach(), out.float())
    s_grads = [sqnr_db(t.grad, g.float()) for t, g in zip(leaves, grads)]
    print(f"{name}: out {s_out:.1f} dB, grads " + ", ".join(f"{s:.1f}" for s in s_grads) + " dB")
    assert s_out >= 45.0  # the forward is exact up to one bf16 rounding
    assert all(s >= 18.0 for s in s_grads)


def test_forward_uses_original_inputs():
    """fp32 outputs carry only fp32 rounding error (FP8 would be ~2^-5 relative): within 8·2^-24·m of fp64."""
    g, u = (torch.randn(64, 256, generator=torch.Generator().manual_seed(s)) * 2 for s in (1, 2))
    for name, (call, gated, fn) in OPS.items():
        out = call(g, u) if gated else call(g)
        if name.endswith("tanh"):  # 0.5·x·(1 + tanh z) = x·σ(2z); the latter has no cancellation, even in fp64
            fn = lambda t: t * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))
        ref = fn(g.double()) * (u.double() if gated else 1.0)
        m = _mags(g, name)[0] * (u.double().abs() if gated else 1.0)
        ratio = float(((out.double() - ref).abs() / (2.0**-24 * m + 2.0**-126)).max())
        print(f"{name}: |out - fp64| <= {ratio:.2f} · 2^-24 · m")
        assert ratio <= 8.0, (name, ratio)


# ---------------------------------------------------------------------------------------------------------------
# what autograd keeps


def test_swiglu_saves_only_fp8_inputs_and_scales():
    rows, n = 3 * 40, 256
    gate, up = (torch.randn(3, 40, n, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = swiglu(gate, up)
    assert [t.dtype for t in saved] == [torch.float8_e4m3fn, torch.float32] * 2
    assert [tuple(t.shape) for t in saved] == [(3, 40, n), (3, 40, n // 16)] * 2
    numel = rows * n
    assert sum(t.numel() * t.element_size() for t in saved) == 2 * numel + 2 * 4 * numel // 16
    assert all(t.data_ptr() != out.data_ptr() for t in saved)
    gq, gs = quantize_per_group(gate.detach(), "e4m3", 16)
    uq, us = quantize_per_group(up.detach(), "e4m3", 16)
    for a, b in zip(saved, (gq, gs, uq, us)):
        assert_bit_equal(a, b)
    out.sum().backward()  # the saved tensors suffice


@pytest.mark.parametrize("name", ["gelu", "silu", "gelu_tanh", "quick_gelu"])
def test_plain_ops_save_only_fp8_input(name):
    x = torch.randn(8, 48, requires_grad=True)
    _, saved, _ = _run(name, [x], torch.ones(8, 48))
    assert [t.dtype for t in saved] == [torch.float8_e4m3fn, torch.float32]
    assert [tuple(t.shape) for t in saved] == [(8, 48), (8, 3)]


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, dispatch, errors


def test_torch_compile_matches_eager():
    torch._dynamo.reset()

    def mlp(x, w_gate, w_up):
        return swiglu(x @ w_gate, x @ w_up).float().pow(2).mean()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 32, generator=g)
    ws = [torch.randn(32, 48, generator=g) * 0.2 for _ in range(2)]
    grads = []
    for f in (mlp, torch.compile(mlp, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in ws]
        loss = f(x, *leaves)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPS))
def test_aot_eager_compile_matches_eager(name):
    """Every public function (two custom ops, parameterized by the activation) under torch.compile: the same bits
    as eager, forward and backward."""
    torch._dynamo.reset()
    call, gated, _ = OPS[name]

    def f(*ts):
        return call(*ts).float().pow(2).sum()

    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(3, 5, 48, generator=g).to(torch.bfloat16) for _ in range(2 if gated else 1)]
    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert_bit_equal(a, b, name)


_OPCHECK = ("test_faketensor", "test_autograd_registration")  # test_schema multiplies the FP8 outputs: no CPU kernel


def test_custom_ops_opcheck():
    """Fake implementation and autograd registration of the two activation ops and their backwards."""
    x, u = torch.randn(4, 40), torch.randn(4, 40)
    for code in act.ACTIVATIONS.values():
        for link in (None, torch.zeros(())):
            torch.library.opcheck(act._gated_op, (x, u, link, code, 16, "torch"), test_utils=_OPCHECK)
        torch.library.opcheck(act._plain_op, (x, code, 16, "torch"), test_utils=_OPCHECK)
        out = act._gated_op(x, u, None, code, 16, "torch")
        for want_amax in (False, True):
            torch.library.opcheck(act._gated_backward_op, (x, *out[1:5], code, 16, "torch", want_amax),
                                  test_utils=_OPCHECK)
        saved = act._plain_op(x, code, 16, "torch")[1:]
        torch.library.opcheck(act._plain_backward_op, (x, *saved, code, 16, "torch"), test_utils=_OPCHECK)


def test_default_backend_and_errors():
    x, u = torch.randn(4, 40), torch.randn(4, 40)
    assert act.resolve_backend(x, None) == ("triton" if x.is_cuda else "torch")
    assert torch.equal(swiglu(x, u), swiglu(x, u, backend="torch"))
    with pytest.raises(ValueError, match="unknown backend"):
        swiglu(x, u, backend="cuda")
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, approximate="erf")
    with pytest.raises(ValueError, match="same shape"):
        swiglu(x, u[:, :20])
    with pytest.raises(ValueError, match="same shape"):
        swiglu(x, u.double())
    with pytest.raises(ValueError, match="group_size"):
        silu(x, group_size=24)
    with pytest.raises(ValueError, match="at least one dimension"):
        silu(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------------------------
# GPU: real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["swiglu", "gelu", "quick_gelu"])
def test_gpu_llama_shape(name):
    """8192 × 11008 bf16 (Llama-7B MLP): Triton vs the torch reference on the GPU, same checks as on CPU."""
    torch.manual_seed(0)
    gated = OPS[name][1]
    inputs = [torch.randn(8192, 11008, device="cuda", dtype=torch.bfloat16) * (1.5 if i == 0 else 1.0)
              for i in range(2 if gated else 1)]
    dy = torch.randn(8192, 11008, device="cuda", dtype=torch.bfloat16)
    _compare_backends(name, inputs, dy)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf · 0
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_output_amax(dtype):
    """``swiglu_with_saved``'s last output is max |out| over the whole output (NaN counted as +inf) on both backends:
    the per-tensor scale the down projection takes instead of reading the output again."""
    dev = device()
    g = torch.Generator().manual_seed(41)
    gate = (torch.randn(37, 200, generator=g) * 3).to(dtype=dtype, device=dev)
    up = (torch.randn(37, 200, generator=g) * 3).to(dtype=dtype, device=dev)
    for backend in ("torch", "triton"):
        out, *_, out_amax = act.swiglu_with_saved(gate, up, backend=backend)
        assert out_amax.dim() == 0 and out_amax.dtype == torch.float32
        assert out_amax.item() == out.float().abs().max().item(), backend
        zeros = act.swiglu_with_saved(torch.zeros_like(gate), up, backend=backend)[-1]
        assert zeros.item() == 0.0, backend
        bad = gate.clone()
        bad[5, 7] = float("nan")
        assert act.swiglu_with_saved(bad, up, backend=backend)[-1].item() == float("inf"), backend
        empty = act.swiglu_with_saved(gate[:0], up[:0], backend=backend)[-1]
        assert empty.item() == 0.0, backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_gradients_amax_through_the_link(dtype):
    """With a ``grad_amax_link``, SwiGLU's backward returns the joint max of |d_gate| and |d_up| as the link's
    gradient (NaN counted as +inf), on both backends and in the eager and registered paths; the gradients
    themselves are those without a link, bit for bit. Without a link nothing is returned for it."""
    dev = device()
    g = torch.Generator().manual_seed(43)
    gate = (torch.randn(37, 200, generator=g) * 3).to(dtype=dtype, device=dev)
    up = (torch.randn(37, 200, generator=g) * 3).to(dtype=dtype, device=dev)
    dy = torch.randn(37, 200, generator=g).to(dtype=dtype, device=dev)
    cases = [("finite", dy), ("zero", torch.zeros_like(dy))]
    bad = dy.clone()
    bad[3, 9] = float("nan")
    cases.append(("nan", bad))
    for backend in ("torch", "triton"):
        for name, d in cases:
            leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
            link = torch.zeros((), device=dev, requires_grad=True)
            out = act.swiglu_with_saved(*leaves, grad_amax_link=link, backend=backend)[0]
            dg, du, dlink = torch.autograd.grad(out, [*leaves, link], d)
            want = torch.maximum(dg.float().abs().nan_to_num(nan=float("inf")).max(),
                                 du.float().abs().nan_to_num(nan=float("inf")).max())
            assert dlink.dim() == 0 and dlink.dtype == torch.float32
            assert dlink.item() == want.item(), (backend, name)
            leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
            plain = torch.autograd.grad(act.swiglu_with_saved(*leaves, backend=backend)[0], leaves, d)
            for a, b in zip(plain, (dg, du)):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{backend} {name}")
        empty = [gate[:0].clone().requires_grad_(), up[:0].clone().requires_grad_()]
        link = torch.zeros((), device=dev, requires_grad=True)
        out = act.swiglu_with_saved(*empty, grad_amax_link=link, backend=backend)[0]
        assert torch.autograd.grad(out, link, dy[:0])[0].item() == 0.0, backend


def test_swiglu_gradients_amax_compiled():
    """The link survives ``torch.compile`` (aot_eager): the same gradients and link gradient as eager."""
    g = torch.Generator().manual_seed(44)
    gate, up, dy = (torch.randn(6, 64, generator=g).bfloat16() for _ in range(3))

    def f(a, b, link):
        return act.swiglu_with_saved(a, b, grad_amax_link=link, backend="torch")[0]

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_(), torch.zeros((), requires_grad=True)]
        results.append(torch.autograd.grad(fn(*leaves), leaves, dy))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][2].item() == max(results[0][0].float().abs().max().item(),
                                       results[0][1].float().abs().max().item())
