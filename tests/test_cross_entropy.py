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
    assert rep.total_bytes == 256 * 32 * 4 + 256 * 8 + 256 * 4 + 8  # hidden, labels, per-token logsumexp, count
    _, full = measure_saved_tensors(lambda: F.cross_entropy((h @ w.t()).float(), y), modules=holder)
    assert full.total_bytes > 256 * 1000 * 4  # the logits


def test_default_chunk_size():
    from fp8coat.ops.cross_entropy import default_chunk

    assert default_chunk(32000) == 1024  # 1024 × 32000 × 4 B = 125 MiB
    assert default_chunk(16384) == 2048
    assert default_chunk(128256) == 256
    assert default_chunk(10**9) == 64
    for v in (1000, 32000, 50257, 151936):
        c = default_chunk(v)
        assert c & (c - 1) == 0 and (c * v * 4 <= 128 * 2**20 or c == 64)


def test_bad_chunk():
    h, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, y, chunk=0)
