"""LM-head + cross-entropy without materializing the logits.

``linear_cross_entropy(hidden, weight, labels)`` = ``F.cross_entropy(hidden @ weightᵀ, labels)`` (token mean,
``ignore_index`` -100) computed over chunks of tokens. When gradients are needed, the forward computes them right
away, chunk by chunk (softmax minus one-hot, then ``d_hidden = d_logits·W`` and ``d_W += d_logitsᵀ·hidden``
accumulated in fp32; a single chunk computes ``d_W`` in one GEMM), and keeps only ``d_hidden`` and ``d_W`` (in the
input dtypes) for backward, which scales them by the incoming gradient. For a 32k vocabulary the fp32 logits and
their gradient would cost 2 × tokens × 32000 × 4 bytes (2 GiB at 8192 tokens); here the peak is one chunk's worth
plus the fp32 ``d_W`` accumulator. The logits are computed once (no recomputation in backward) and nothing
synchronizes with the host. The forward is the custom op ``fp8coat::linear_cross_entropy`` (returning the loss
and the two gradients, which its registered autograd formula saves), opaque to ``torch.compile``.
On CUDA each chunk's loss and logit gradient come from one Triton kernel that overwrites the logits with their
gradient (``cross_entropy_kernels.py``; reference: ``_chunk_torch``). Logits are computed in the dtype of
``hidden``/``weight`` (bf16) and reduced in fp32, like the usual ``logits.float()`` + ``cross_entropy``.
"""

from __future__ import annotations

import functools

import torch

from ..quantization import resolve_backend
from .eager import call, register_eager

__all__ = ["default_chunk", "linear_cross_entropy"]

IGNORE_INDEX = -100


def _chunk_torch(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, write_grad: bool):
    """Reference of one chunk: (per-token loss (C,) fp32, gradient of the mean loss w.r.t. ``logits`` in their
    dtype or None). Ignored tokens contribute 0 to both; ``count`` (0-d fp32): kept tokens in the whole batch."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp_min(0)[:, None]
    picked = z.gather(1, safe)[:, 0]
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if not write_grad:
        return loss, None
    probs = z.sub_(lse[:, None]).exp_()  # softmax, in place: one fp32 chunk alive
    probs.scatter_add_(1, safe, -torch.ones_like(picked)[:, None])  # minus one-hot
    w = torch.where(valid, 1.0 / count.float(), torch.zeros_like(lse))  # d(mean loss)/d(token loss)
    return loss, probs.mul_(w[:, None]).to(logits.dtype)


def _chunk(logits, labels, count, write_grad):
    if resolve_backend(logits, None) == "triton":
        from .cross_entropy_kernels import ce_chunk_triton

        loss = ce_chunk_triton(logits, labels, count, write_grad, IGNORE_INDEX)
        return loss, (logits if write_grad else None)
    return _chunk_torch(logits, labels, count, write_grad)


@functools.cache
def _fp32_addmm_in_place(device_type: str) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=float32, out=c)`` accumulates bf16 products into an fp32 ``c``
    here (CUDA builds of recent torch): checked once per device type on a tiny product."""
    try:
        a = torch.ones(2, 3, dtype=torch.bfloat16, device=device_type)
        c = torch.full((2, 2), 0.5, device=device_type)
        torch.addmm(c, a, a.t(), out_dtype=torch.float32, out=c)
        return bool((c == 3.5).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate(d_weight: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor) -> None:
    """``d_weight += d_logitsᵀ·h`` in fp32: straight into ``d_weight`` where supported, else through a product
    in the inputs' dtype."""
    if d_logits.dtype != torch.float32 and _fp32_addmm_in_place(d_weight.device.type):
        # an out= product is not autocast: under autocast h may be fp32 while the logits are bf16
        torch.addmm(d_weight, d_logits.t(), h.to(d_logits.dtype), out_dtype=torch.float32, out=d_weight)
    else:
        d_weight += d_logits.t() @ h


def _forward_impl(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, want_dh: bool,
                  want_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss 0-d fp32, d_hidden or an empty tensor, d_weight or an empty tensor): the gradients of the mean
    loss, computed chunk by chunk (``want_dh`` / ``want_dw``: which ones)."""
    n = hidden.shape[0]
    count = (labels != IGNORE_INDEX).sum().clamp_min(1).float()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if want_dh else hidden.new_empty(0)
    single = 0 < n <= chunk  # one chunk: its weight gradient is one GEMM (fp32 accumulation inside)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw and not single \
        else None
    for s in range(0, n, chunk):
        h = hidden[s: s + chunk]
        loss, d_logits = _chunk(h @ weight.t(), labels[s: s + chunk], count, want_dh or want_dw)
        total += loss.sum()
        if want_dh:  # (a copy: under autocast the product's dtype may differ from hidden's)
            d_hidden[s: s + chunk] = d_logits @ weight
        if want_dw and single:
            d_weight = d_logits.t() @ h
        elif want_dw:
            _accumulate(d_weight, d_logits, h)
        del d_logits
    if want_dw:
        d_weight = d_weight.to(weight.dtype)
    else:
        d_weight = weight.new_empty(0)
    return total / count, d_hidden, d_weight


_op = torch.library.custom_op("fp8coat::linear_cross_entropy", _forward_impl, mutates_args=())


@_op.register_fake
def _(hidden, weight, labels, chunk, want_dh, want_dw):
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, hidden.new_empty(hidden.shape if want_dh else 0), weight.new_empty(weight.shape if want_dw else 0)


def _setup_context(ctx, inputs, output):
    _, d_hidden, d_weight = output
    ctx.mark_non_differentiable(d_hidden, d_weight)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.wants = inputs[4:]  # want_dh, want_dw


def _backward(ctx, grad, _dh, _dw):
    """Scales the gradients computed in forward by the incoming gradient of the loss."""
    if grad is None:
        return None, None, None, None, None, None
    d_hidden, d_weight = ctx.saved_tensors
    want_dh, want_dw = ctx.wants
    dh = d_hidden * grad.to(d_hidden.dtype) if want_dh else None
    dw = d_weight * grad.to(d_weight.dtype) if want_dw else None
    return dh, dw, None, None, None, None


torch.library.register_autograd("fp8coat::linear_cross_entropy", _backward, setup_context=_setup_context)
register_eager(_op, _forward_impl, _setup_context, _backward)


CHUNK_BYTES = 128 * 2**20  # default chunk: the tokens whose fp32 logits fit in this


def default_chunk(vocab_size: int, bytes_per_logit: int = 4) -> int:
    """Tokens per chunk whose logits take at most 128 MiB, a power of two >= 64: 1024 for a 32k vocabulary with
    fp32 logits (the torch path upcasts each chunk), 2048 with bf16 logits (the fused CUDA kernel works in place).
    (All 8192 tokens of a 4-layer Llama-7B-shaped step in one chunk measured no faster on the H200.)"""
    tokens = max(1, CHUNK_BYTES // (bytes_per_logit * max(vocab_size, 1)))
    return max(64, 1 << (tokens.bit_length() - 1))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``labels`` (-100 = ignored), chunked over tokens.

    ``hidden``: (..., H); ``weight``: (V, H); ``labels``: (...,) int64; ``chunk``: tokens per chunk (default:
    :func:`default_chunk` of V and the logits' bytes — about 128 MiB of logits per chunk, plus an fp32
    accumulator of the weight's gradient). Gradients are computed in the forward when grad mode is on and an
    input requires them; ``backward`` then only scales them. Returns a 0-d fp32 tensor.
    """
    if chunk is None:
        fused = resolve_backend(hidden, None) == "triton"
        chunk = default_chunk(weight.shape[0], hidden.element_size() if fused else 4)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    h = hidden.reshape(-1, hidden.shape[-1])
    grad = torch.is_grad_enabled()
    want_dh, want_dw = grad and h.requires_grad, grad and weight.requires_grad
    return call(_op, h, weight, labels.reshape(-1), int(chunk), want_dh, want_dw)[0]
