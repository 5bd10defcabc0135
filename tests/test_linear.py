"""FP8 linear op: numerics vs fp32, what it saves, the weight cache, shapes, compile, GPU GEMM path."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import device, sqnr_db

from fp8coat.memory import measure_saved_tensors
from fp8coat.ops.linear import FP8WeightCache, fp8_mm, linear, linears
from fp8coat.quantization import quantize_per_tensor


def _ref(x, ws, bs):
    xr = x.detach().float().requires_grad_()
    wr = [w.detach().float().requires_grad_() for w in ws]
    br = [b.detach().float().requires_grad_() if b is not None else None for b in bs]
    ys = [xr @ w.t() + (b if b is not None else 0) for w, b in zip(wr, br)]
    return xr, wr, br, ys


@pytest.mark.parametrize("shape,k,ns", [((4, 33), 64, [128, 48]), ((2, 3, 17), 70, [33]), ((256,), 128, [64, 64, 32])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linears_match_fp32_reference(shape, k, ns, dtype):
    """Outputs and all gradients within SQNR thresholds (measured: ~27-30 dB outputs, ~25-31 dB grads)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, k, generator=g).to(device(), dtype).requires_grad_()
    ws = [(torch.randn(n, k, generator=g) / k**0.5).to(device()).requires_grad_() for n in ns]
    bs = [torch.randn(n, generator=g).to(device()).requires_grad_() if i % 2 else None for i, n in enumerate(ns)]
    caches = [FP8WeightCache() for _ in ns]
    ys = linears(x, ws, bs, caches)
    for y, n in zip(ys, ns):
        assert y.shape == (*shape, n) and y.dtype == dtype
    gouts = [torch.randn(y.shape, generator=g).to(device()) for y in ys]
    sum((y.float() * go).sum() for y, go in zip(ys, gouts)).backward()
    xr, wr, br, yr = _ref(x, ws, bs)
    sum((y * go).sum() for y, go in zip(yr, gouts)).backward()
    for y, r in zip(ys, yr):
        assert sqnr_db(r, y.detach().float()) > 20
    assert sqnr_db(xr.grad, x.grad.float()) > 18
    for w, r in zip(ws, wr):
        assert w.grad.dtype == w.dtype and sqnr_db(r.grad, w.grad) > 18
    for b, r in zip(bs, br):
        if b is not None:
            assert sqnr_db(r.grad, b.grad) > 40  # bias grads come from the unquantized dY


def test_saves_only_fp8_transposed_input_once_for_shared_layers():
    x = torch.randn(3, 50, 64, device=device(), dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(n, 64, device=device(), requires_grad=True) for n in (64, 32, 32)]
    _, rep = measure_saved_tensors(lambda: linears(x, ws), modules=None)
    m_pad = -(-150 // 16) * 16
    fp8 = [e for e in rep.entries if e[2] == torch.float8_e4m3fn]
    assert len(fp8) == 1 and fp8[0][3] == (64, m_pad)  # one K-major copy for three layers, tokens padded to 16
    weights = sum(w.numel() * 4 for w in ws)
    # FP8 input, its scale, the weights themselves and their scales
    assert rep.total_bytes == 64 * m_pad + 4 + weights + 4 * len(ws)
    mod = torch.nn.ModuleList([torch.nn.Linear(64, 64)]).to(device())
    _, rep = measure_saved_tensors(lambda: linear(x, mod[0].weight, mod[0].bias), modules=mod)
    assert rep.total_bytes == 64 * m_pad + 4 + 4 and rep.parameter_bytes == 64 * 64 * 4


def test_save_input_hp_keeps_the_input_itself():
    x = torch.randn(40, 64, device=device(), dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(32, 64, device=device()))
    lin = torch.nn.ModuleList([torch.nn.Linear(1, 1)])
    _, rep = measure_saved_tensors(lambda: linear(x, w, save_input_hp=True), modules=lin)
    assert [e[2] for e in rep.entries if e[4] > 4] == [torch.bfloat16, torch.float32]  # x and the weight
    y = linear(x, w, save_input_hp=True)
    y.float().sum().backward()
    y2 = linear(x.detach().requires_grad_(), w)
    assert torch.isfinite(x.grad).all()
    assert torch.equal(y, y2)


@pytest.mark.parametrize("ns", [[64], [64, 32, 32]])
def test_frozen_weights_save_nothing_of_the_input(ns):
    """Weights that do not require grad (a frozen layer the gradient still passes through): no wgrad, so nothing of
    the input is kept — only the 0-d fp32 scales of x and of each weight (4 bytes each) — and backward gives the
    same input gradient, bit for bit, and the bias gradients; the weights' grads stay None."""
    g = torch.Generator().manual_seed(len(ns))
    x = torch.randn(3, 50, 64, generator=g).to(device=device(), dtype=torch.bfloat16)
    ws = [torch.randn(n, 64, generator=g).to(device()) * 0.1 for n in ns]
    bs = [torch.randn(n, generator=g).to(device()) for n in ns]
    dys = [torch.randn(3, 50, n, generator=g).to(device=device(), dtype=torch.bfloat16) for n in ns]
    results = []
    for frozen in (False, True):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_(not frozen) for w in ws]
        bi = [b.clone().requires_grad_() for b in bs]
        ys, rep = measure_saved_tensors(linears, xi, wi, bi)
        torch.autograd.backward(ys, dys)
        fp8 = [e for e in rep.entries if e[2] == torch.float8_e4m3fn]
        if frozen:
            assert fp8 == [] and rep.total_bytes == sum(w.numel() * 4 for w in ws) + 4 + 4 * len(ns)
            assert all(w.grad is None for w in wi)
        else:
            assert len(fp8) == 1 and all(w.grad is not None for w in wi)
        results.append((ys, xi.grad, [b.grad for b in bi]))
    (ys0, dx0, db0), (ys1, dx1, db1) = results
    assert all(torch.equal(a, b) for a, b in zip(ys0, ys1))
    assert torch.equal(dx0, dx1) and all(torch.equal(a, b) for a, b in zip(db0, db1))
    with torch.no_grad():  # grad mode off: nothing for backward is computed either
        assert all(torch.equal(a, b) for a, b in zip(linears(x, ws, bs), ys0))


@pytest.mark.parametrize("ns", [[64, 32, 32], [48, 16]])
def test_shared_input_backward_is_one_fused_projection(ns):
    """Several layers on one input: dX is ONE FP8 GEMM over [dY_1 … dY_n] (joint E5M2 scale) and [W_1ᵀ … W_nᵀ]
    (scale max_i sW_i), dW_i uses the joint gradient scale — bit-exact against that computation from the
    primitives (emulated GEMM, fp32 products of FP8 values)."""
    from fp8coat.formats import E4M3, E5M2
    from fp8coat.quantization import quantize_transpose, scale_from_amax, tensor_amax

    g = torch.Generator().manual_seed(11)
    k, m = 64, 50
    x = torch.randn(m, k, generator=g, dtype=torch.bfloat16).requires_grad_()
    ws = [(torch.randn(n, k, generator=g) / 8).bfloat16().requires_grad_() for n in ns]
    ws[-1].data.mul_(30)  # the layers' weight and gradient scales differ
    caches = [FP8WeightCache() for _ in ns]
    ys = linears(x, ws, caches=caches, emulate=True)
    gouts = [torch.randn(y.shape, generator=g).bfloat16() * (100 if i == 0 else 1) for i, y in enumerate(ys)]
    torch.autograd.backward(ys, gouts)

    sx = scale_from_amax(tensor_amax(x), E4M3)
    _, xqt = quantize_transpose(x.detach(), E4M3, sx, rowwise=False)
    sg = scale_from_amax(torch.stack([tensor_amax(go) for go in gouts]).amax(), E5M2)
    sw = torch.stack([scale_from_amax(tensor_amax(w), E4M3) for w in ws]).amax()
    assert sw == max(c.scale for c in caches)
    gq = torch.cat([quantize_transpose(go, E5M2, sg)[0] for go in gouts], dim=1)
    wqt = torch.cat([quantize_transpose(w.detach(), E4M3, sw, rowwise=False, pad_to=1)[1] for w in ws], dim=1)
    dx = fp8_mm(gq, sg, wqt, sw, torch.bfloat16, emulate=True)
    assert torch.equal(x.grad, dx)
    for go, w in zip(gouts, ws):
        dw = fp8_mm(quantize_transpose(go, E5M2, sg)[1], sg, xqt, sx, w.dtype, emulate=True)
        assert torch.equal(w.grad, dw)


def test_emulated_gemm_is_exact_fp8_math():
    g = torch.Generator().manual_seed(1)
    a, sa = quantize_per_tensor(torch.randn(20, 48, generator=g), "e4m3")
    b, sb = quantize_per_tensor(torch.randn(24, 48, generator=g), "e4m3")
    out = fp8_mm(a, sa, b, sb, torch.float32, emulate=True)
    ref = (a.double() @ b.double().t()) * (sa.double() * sb.double())
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_linears_under_torch_compile_match_eager():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 24, 32, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(48, 32, generator=g).requires_grad_()
    cache = FP8WeightCache()

    def f(x, w):
        return linear(x, w, cache=cache).float().pow(2).sum()

    f(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    torch.compile(f)(x, w).backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("m,ns", [(4096, [11008]), (4000, [11008]), (4000, [4096, 1024, 1024])])
def test_scaled_mm_path_matches_emulation_on_gpu(m, ns):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, 4096, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    ws = [(torch.randn(n, 4096, device="cuda", generator=g) / 64).bfloat16().requires_grad_() for n in ns]
    outs = {}
    for emulate in (False, True):
        x.grad = None
        for w in ws:
            w.grad = None
        ys = linears(x, ws, emulate=emulate, fast_accum=False)
        sum(y.float().pow(2).mean() for y in ys).backward()
        outs[emulate] = [y.detach().float() for y in ys] + [x.grad.float()] + [w.grad.float() for w in ws]
    for a, b in zip(outs[False], outs[True]):
        assert sqnr_db(b, a) > 40  # same FP8 operands; only accumulation order/precision differs


def test_x_amax_gives_the_scale():
    """``x_amax`` (the producer's max |x|) replaces the amax pass over x: the true amax gives the same outputs and
    gradients bit for bit; another number changes the input's scale, hence the outputs."""
    from fp8coat.quantization import tensor_amax

    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 64, generator=g).bfloat16().requires_grad_()
    ws = [torch.randn(32, 64, generator=g).bfloat16().requires_grad_() for _ in range(2)]
    plain = linears(x, ws)
    handed = linears(x, ws, x_amax=tensor_amax(x.detach()))
    for a, b in zip(plain, handed):
        assert torch.equal(a, b)
    grads = torch.autograd.grad(sum(y.float().sum() for y in plain), [x, *ws])
    grads_handed = torch.autograd.grad(sum(y.float().sum() for y in handed), [x, *ws])
    for a, b in zip(grads, grads_handed):
        assert torch.equal(a, b)
    wrong = linears(x, ws, x_amax=tensor_amax(x.detach()) * 3)
    assert not torch.equal(wrong[0], plain[0])


class _ScaledLinkGrad(torch.autograd.Function):
    """``y_i * 1`` for each output, returning ``factor ×`` the joint amax of the incoming gradients as the link's
    gradient (1: what the SwiGLU op returns; others: a wrong amax, to show the backward uses it)."""

    @staticmethod
    def forward(ctx, factor, link, *ys):
        ctx.factor = factor
        return tuple(y.clone() for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        from fp8coat.quantization import tensor_amax

        amax = functools.reduce(torch.maximum, [tensor_amax(g) for g in grads])
        return (None, amax * ctx.factor, *grads)


@pytest.mark.parametrize("n", [1, 2])
def test_grad_amax_link_gives_the_gradients_scale(n, monkeypatch):
    """``grad_amax_link=True`` returns a 0-d zero after the outputs; the gradient the consumer returns for it is the
    joint amax of the outputs' gradients, and the backward takes their scale from it: the true amax gives the same
    gradients bit for bit (one pass over the gradients fewer), another number changes them. A link nothing
    consumes leaves the backward as without it."""
    from fp8coat.ops import linear as linear_op

    g = torch.Generator().manual_seed(9)
    x = torch.randn(24, 64, generator=g).bfloat16().requires_grad_()
    ws = [torch.randn(32, 64, generator=g).bfloat16().requires_grad_() for _ in range(n)]
    dys = [torch.randn(24, 32, generator=g).bfloat16() for _ in range(n)]
    plain = linears(x, ws)
    *linked, link = linears(x, ws, grad_amax_link=True)
    assert link.shape == () and link.dtype == torch.float32 and link.item() == 0.0 and link.requires_grad
    for a, b in zip(plain, linked):
        assert torch.equal(a, b)
    want = torch.autograd.grad(plain, [x, *ws], dys)
    calls = []
    joint, single = linear_op.joint_tensor_scale, linear_op.tensor_scale
    monkeypatch.setattr(linear_op, "joint_tensor_scale", lambda xs, fmt: calls.append(len(xs)) or joint(xs, fmt))
    monkeypatch.setattr(linear_op, "tensor_scale", lambda t, fmt: calls.append(1) or single(t, fmt))
    for factor, same in ((1.0, True), (3.0, False)):
        *ys, link = linears(x, ws, grad_amax_link=True)
        calls.clear()
        got = torch.autograd.grad(_ScaledLinkGrad.apply(factor, link, *ys), [x, *ws], dys)
        assert calls == []  # the gradients' scale came through the link: no pass over them
        assert all(torch.equal(a, b) for a, b in zip(want, got)) == same, factor
    *ys, link = linears(x, ws, grad_amax_link=True)  # a link nothing consumes: no gradient reaches it
    unlinked = torch.autograd.grad(ys, [x, *ws], dys)
    for a, b in zip(want, unlinked):
        assert torch.equal(a, b)
