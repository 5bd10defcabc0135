"""Chunked LM-head cross-entropy: same loss and gradients as logits + F.cross_entropy, without keeping logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp8coat.memory import measure_saved_tensors
from fp8coat.ops.cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_matches_full_logits_cross_entropy(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, 32, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(100, 32, generator=g) / 6).to(dtype).requires_grad_()
    y = torch.randint(0, 100, (3, 40), generator=g)
    y[0, :5] = -100  # ignored positions
    loss = linear_cross_entropy(h, w, y, chunk=chunk)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t()).float().reshape(-1, 100), y.reshape(-1))
    ref.backward()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert torch.allclose(h.grad.float(), h2.grad.float(), rtol=tol * 5, atol=tol * 1e-2)
    assert torch.allclose(w.grad.float(), w2.grad.float(), rtol=tol * 5, atol=tol * 1e-2)


def test_saves_no_logits():
    h = torch.randn(256, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000, 32))
    y = torch.randint(0, 1000, (256,))
    holder = torch.nn.ModuleList([torch.nn.Linear(1, 1)])
    holder[0].weight = w
    _, rep = measure_saved_tensors(lambda: linear_cross_entropy(h, w, y, chunk=64), modules=holder)
    assert rep.total_bytes == 256 * 32 * 4 + 1000 * 32 * 4  # the gradients of hidden and weight, computed in forward
    _, full = measure_saved_tensors(lambda: F.cross_entropy((h @ w.t()).float(), y), modules=holder)
    assert full.total_bytes > 256 * 1000 * 4  # the logits


@pytest.mark.parametrize("chunk", [8, 64])  # several chunks (fp32 accumulator) and one chunk (one GEMM)
@pytest.mark.parametrize("wants", ["both", "hidden", "weight"])
def test_scaled_loss_partial_grads_and_no_grad(wants, chunk):
    """backward scales the gradients computed in forward by the incoming gradient; only the requested ones exist;
    under no_grad the loss is the same and nothing is computed for backward."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 16, generator=g).requires_grad_(wants in ("both", "hidden"))
    w = torch.randn(30, 16, generator=g).requires_grad_(wants in ("both", "weight"))
    y = torch.randint(0, 30, (50,), generator=g)
    y[::7] = -100
    (linear_cross_entropy(h, w, y, chunk=chunk) * -2.5).backward()
    h2, w2 = h.detach().clone().requires_grad_(h.requires_grad), w.detach().clone().requires_grad_(w.requires_grad)
    ref = F.cross_entropy(h2 @ w2.t(), y)
    (ref * -2.5).backward()
    for a, b in ((h, h2), (w, w2)):
        assert (a.grad is None) == (not b.requires_grad)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=chunk), ref.detach(), rtol=1e-6, atol=0)


def test_autocast_one_chunk_and_several_chunks_agree():
    """Under autocast the logits (and their gradient) are bf16 while hidden and weight are fp32: both paths write
    fp32 gradients, within bf16 rounding of each other."""
    g = torch.Generator().manual_seed(2)
    grads = []
    for chunk in (16, 10_000):
        h = torch.randn(40, 32, generator=g.manual_seed(2)).requires_grad_()
        w = torch.randn(50, 32, generator=g.manual_seed(3)).requires_grad_()
        y = torch.randint(0, 50, (40,), generator=g.manual_seed(4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear_cross_entropy(h, w, y, chunk=chunk).backward()
        assert h.grad.dtype == w.grad.dtype == torch.float32
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_all_tokens_ignored():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((6,), -100), chunk=4)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_default_chunk_size():
    from fp8coat.ops.cross_entropy import default_chunk

    assert default_chunk(32000) == 1024  # 1024 × 32000 × 4 B = 125 MiB
    assert default_chunk(16384) == 2048
    assert default_chunk(128256) == 256
    assert default_chunk(10**9) == 64
    assert default_chunk(32000, bytes_per_logit=2) == 2048  # bf16 logits, fused kernel
    for v in (1000, 32000, 50257, 151936):
        c = default_chunk(v)
        assert c & (c - 1) == 0 and (c * v * 4 <= 128 * 2**20 or c == 64)


def _loss_and_grads(fn, h, w, y):
    leaves = [h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    loss = fn(*leaves, y)
    (loss * 1.5).backward()
    return [loss.detach(), leaves[0].grad, leaves[1].grad]


@pytest.mark.parametrize("chunk", [8, 64])
def test_eager_path_skips_the_dispatcher_and_equals_the_registered_op(chunk, monkeypatch):
    """Eager calls run the op's functions through ``ops.eager`` (no custom-op dispatch), with the same bits as
    the registered ``fp8coat::linear_cross_entropy``."""
    from fp8coat.ops import eager

    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(40, 16, generator=g).to(torch.bfloat16), torch.randn(30, 16, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 30, (40,), generator=g)
    y[::5] = -100

    def fn(a, b, t):
        return linear_cross_entropy(a, b, t, chunk=chunk)

    assert type(fn(h.requires_grad_(), w, y).grad_fn) is eager._EagerOp._backward_cls
    h.requires_grad_(False)
    got = _loss_and_grads(fn, h, w, y)
    monkeypatch.setattr(eager, "_PLAIN", ())  # every call takes the registered custom op
    assert "fp8coat_linear_cross_entropy" in type(fn(h.clone().requires_grad_(), w, y).grad_fn).__name__
    want = _loss_and_grads(fn, h, w, y)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [8, 64])
def test_aot_eager_compile_matches_eager(chunk):
    torch._dynamo.reset()

    def f(a, b, t):
        return linear_cross_entropy(a * 2.0, b, t, chunk=chunk)

    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(40, 16, generator=g), torch.randn(30, 16, generator=g)
    y = torch.randint(0, 30, (40,), generator=g)
    y[::3] = -100
    want = _loss_and_grads(f, h, w, y)
    got = _loss_and_grads(torch.compile(f, backend="aot_eager", fullgraph=True), h, w, y)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_custom_op_registrations():
    from fp8coat.ops import cross_entropy as ce

    h, w, y = torch.randn(12, 8), torch.randn(5, 8), torch.randint(0, 5, (12,))
    for wants in ((True, True), (True, False), (False, True), (False, False)):
        torch.library.opcheck(ce._op, (h, w, y, 4, *wants),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_chunk():
    h, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, y, chunk=0)


triton = pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [7, 300, 5000])
@pytest.mark.parametrize("case", ["normal", "huge", "masked_vocab"])
def test_triton_chunk_matches_reference(dtype, vocab, case):
    """The fused kernel (interpreter on CPU, native on CUDA) against ``_chunk_torch``: loss to fp32 rounding,
    gradient within one rounding of the logits' dtype."""
    from fp8coat.ops.cross_entropy import IGNORE_INDEX, _chunk_torch
    from fp8coat.ops.cross_entropy_kernels import ce_chunk_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(vocab)
    rows = 9
    z = torch.randn(rows, vocab, generator=g) * (3e3 if case == "huge" else 4.0)
    if case == "masked_vocab":
        z[:, ::3] = float("-inf")  # e.g. tokens banned by a mask
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[2] = labels[5] = IGNORE_INDEX
    if case == "masked_vocab":
        labels[labels % 3 == 0] += 1
        labels.clamp_(max=vocab - 1)
        labels[labels % 3 == 0] = IGNORE_INDEX
    z, labels = z.to(dtype).to(dev), labels.to(dev)
    count = (labels != IGNORE_INDEX).sum().clamp_min(1).float()
    ref_loss, ref_grad = _chunk_torch(z.clone(), labels, count, True)
    got = z.clone()
    loss = ce_chunk_triton(got, labels, count, True, IGNORE_INDEX)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6 * float(ref_loss.abs().max()))
    assert (loss[[2, 5]] == 0).all()
    # bf16: one rounding step; fp32: the GPU's exp is a few ulp off the CPU's (and torch's) exp
    rtol = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref_grad.float(), rtol=rtol, atol=1e-7)  # p - 1 cancels at the label
    assert (got[[2, 5]] == 0).all()
    # loss only: the logits are left alone
    z2 = z.clone()
    loss2 = ce_chunk_triton(z2, labels, count, False, IGNORE_INDEX)
    assert torch.equal(loss2, loss) and torch.equal(z2, z)


def test_triton_chunk_nan_row_stays_nan():
    from fp8coat.ops.cross_entropy import IGNORE_INDEX
    from fp8coat.ops.cross_entropy_kernels import ce_chunk_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    z = torch.randn(3, 40, device=dev)
    z[1, 7] = float("nan")
    loss = ce_chunk_triton(z, torch.tensor([1, 2, 3], device=dev), torch.tensor(3.0, device=dev), True, IGNORE_INDEX)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()


@pytest.mark.gpu
def test_cuda_matches_full_logits_cross_entropy():
    """On CUDA (fused kernel, fp32 accumulation of the weight gradient) against bf16 logits + F.cross_entropy."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(32000, 256, device="cuda", generator=g) / 16).bfloat16().requires_grad_()
    y = torch.randint(0, 32000, (3000,), device="cuda", generator=g)
    y[::11] = -100
    loss = linear_cross_entropy(h, w, y, chunk=512)
    (loss * 2).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t()).float(), y)
    (ref * 2).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for a, b in ((h.grad, h2.grad), (w.grad, w2.grad)):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2, err  # bf16 gradients; the reference rounds its fp32 softmax gradient to bf16 once too
