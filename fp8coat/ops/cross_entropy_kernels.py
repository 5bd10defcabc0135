"""Triton kernel of one cross-entropy chunk: per-token loss and, in place, the gradient of the logits.

For a chunk of logits ``z`` (C, V) in bf16/fp16/fp32 (rows strided, columns contiguous) and labels ``y`` (C,) int64
(``-100`` = ignored), with ``w = 1 / count`` for kept tokens and 0 for ignored ones (``count``: a 0-d fp32 device
tensor, the number of kept tokens in the whole batch):

    loss[i] = logsumexp(z[i]) - z[i, y[i]]           (fp32; 0 for ignored tokens)
    z[i, :] = (softmax(z[i]) - onehot(y[i])) * w[i]   (written over z in z's dtype, only with WRITE_GRAD)

One program per row: a first pass over the row keeps a running max and sum of exponentials (fp32), a second pass
writes the gradient — the row is read twice and written once, instead of the ~10 passes over an fp32 copy that
the torch ops take. The torch reference with the same semantics is ``cross_entropy._chunk_torch``; results agree
to fp32 rounding (the sums are taken in a different order), not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import next_power_of_2
from .._launch import fast_kernel


@fast_kernel
@triton.jit
def _ce_chunk_kernel(
    z_ptr, y_ptr, count_ptr, loss_ptr,  # z: (C, V), row stride stride_z; y: (C,) int64; count: 0-d fp32; loss: (C,)
    V, stride_z, IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    label = tl.load(y_ptr + row)
    valid = label != IGNORE
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane running max and sum of exp(z - max)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have only seen -inf keep s = 0
        s = s * tl.exp(m - ref) + tl.exp(z - ref)
        m = m_new
    row_max = tl.max(m, axis=0)
    ref_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - ref_max), axis=0))
    safe = tl.where(valid, label, 0)
    picked = tl.load(base + safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    if WRITE_GRAD:
        w = tl.where(valid, 1.0 / tl.load(count_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(offs == safe, 1.0, 0.0)
            tl.store(base + offs, (g * w).to(z_ptr.dtype.element_ty), mask=mask)


def ce_chunk_triton(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, write_grad: bool,
                    ignore_index: int) -> torch.Tensor:
    """Per-token loss (C,) fp32; with ``write_grad`` the gradient of the mean loss overwrites ``logits``."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError("ce_chunk_triton: the logits' columns must be contiguous")
    block_v = min(4096, next_power_of_2(max(v, 16)))
    _ce_chunk_kernel[(c,)](
        logits, labels.contiguous(), count.float().reshape(()), loss, v, logits.stride(0),
        IGNORE=ignore_index, WRITE_GRAD=write_grad, BLOCK_V=block_v,
    )
    return loss
