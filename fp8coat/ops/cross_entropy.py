"""LM-head + cross-entropy without materializing the logits for backward.

``linear_cross_entropy(hidden, weight, labels)`` = ``F.cross_entropy(hidden @ weightᵀ, labels)`` (token mean,
``ignore_index`` -100) computed over chunks of tokens: the forward keeps only ``hidden`` (which the decoder keeps
anyway) and a per-token log-sum-exp (fp32), and backward recomputes each chunk's logits. For a 32k vocabulary the
fp32 logits and their gradient cost 2 × tokens × 32000 × 4 bytes (2 GiB at 8192 tokens); here the peak is one
chunk's worth. Logits are computed in the dtype of ``hidden``/``weight`` (bf16) and reduced in fp32, like the
usual ``logits.float()`` + ``cross_entropy``.
"""

from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy", "default_chunk"]

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp_min(1)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s: s + chunk] @ weight.t()).float()
            lse[s: s + chunk] = torch.logsumexp(logits, dim=-1)
            lab = labels[s: s + chunk]
            picked = logits.gather(1, lab.clamp_min(0)[:, None])[:, 0]
            total += ((lse[s: s + chunk] - picked) * valid[s: s + chunk]).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        scale = grad / ctx.count
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s: s + chunk]
            lab = labels[s: s + chunk]
            probs = (h @ weight.t()).float()
            probs.sub_(lse[s: s + chunk, None]).exp_()  # softmax, in place: one fp32 chunk alive
            valid = (lab != IGNORE_INDEX)
            probs[torch.arange(len(lab), device=lab.device)[valid], lab[valid]] -= 1.0
            d_logits = probs.mul_((scale * valid)[:, None]).to(hidden.dtype)
            del probs
            if d_hidden is not None:
                d_hidden[s: s + chunk] = d_logits @ weight
            if d_weight is not None:
                d_weight += d_logits.t() @ h  # accumulated in fp32 without an fp32 copy of the product
        return d_hidden, (d_weight.to(weight.dtype) if d_weight is not None else None), None, None


CHUNK_BYTES = 128 * 2**20  # default chunk: the tokens whose fp32 logits fit in this


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk whose fp32 logits take at most 128 MiB, a power of two >= 64 (1024 for a 32k vocab)."""
    tokens = max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))
    return max(64, 1 << (tokens.bit_length() - 1))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: "int | None" = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``labels`` (-100 = ignored), chunked over tokens.

    ``hidden``: (..., H); ``weight``: (V, H); ``labels``: (...,) int64; ``chunk``: tokens per chunk (default:
    :func:`default_chunk` of V — the transient memory is a few chunk-sized fp32 logit blocks plus an fp32 copy of
    the weight's gradient). Returns a 0-d fp32 tensor.
    """
    if chunk is None:
        chunk = default_chunk(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    h = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(h, weight, labels.reshape(-1), int(chunk))
