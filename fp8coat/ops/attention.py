"""Scaled dot-product attention that saves only FP8 copies of q, k and v for backward.

    fp8_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, group_size)
        = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa)

Shapes: ``q`` (B, H, Sq, D), ``k`` (B, Hkv, Sk, D), ``v`` (B, Hkv, Sk, Dv), all of one dtype (bf16 / fp16 /
fp32) and device, any strides; ``Hkv == H``, or ``H`` a multiple of ``Hkv`` with ``enable_gqa=True`` (grouped-query
attention: each k/v head serves ``H / Hkv`` query heads, as in ``F.scaled_dot_product_attention``). ``attn_mask``:
None, or a bool / float mask broadcastable to (B, H, Sq, Sk) that needs no gradient. D and Dv need not be multiples
of G. Output: (B, H, Sq, Dv) in q's dtype.

Forward. ``out`` is torch's SDPA on the original q, k, v (autograd off), so it is bit for bit what the plain call
computes. Saved for backward:

    (t_q, t_s) = quantize_per_group(t, E4M3, G)   for t in (q, k, v)
                 t_q: t's shape, float8_e4m3fn; t_s: fp32 (…, ceil(D / G)) — 1×G groups along the head dim,
                 the last group partial when G does not divide D (``fp8coat.quantization.reference``)
    attn_mask    the caller's tensor itself (no copy)

— not q, k, v, the output or the softmax statistics the SDPA kernels keep: D + 4·ceil(D/G) bytes per token and head
for each of q, k and v (3 · 1.25 bytes per element at G = 16) instead of 2 bytes per element for each of q, k, v
and the output in bf16 (8 per element; the kernels' log-sum-exp, 4 bytes per query row and head, also goes).

Backward recomputes the attention from the dequantized inputs — one more attention forward per backward — and
returns its exact vector-Jacobian product there:

    q̂, k̂, v̂ = dequantize_per_group(t_q, t_s, G) in q's dtype      (fp32(t_q) · t_s, rounded once)
    dq, dk, dv = vjp of (q̂, k̂, v̂) ↦ SDPA(q̂, k̂, v̂, attn_mask, is_causal, scale, enable_gqa) applied to dout

i.e. the gradients autograd computes through SDPA at the quantized inputs, as the FP8 norms and activations give
the exact gradients at their quantized inputs. The error against BF16 gradients is the quantization error of q, k
and v propagated through attention (tests/test_attention.py bounds it by an SQNR). Dropout is not supported: a
recompute would draw a different mask (``fp8coat.nn.attention`` keeps such calls on plain SDPA).

Non-finite inputs. The forward is plain SDPA, so a NaN / inf spreads exactly as there (a NaN in one query row
makes that row's output NaN; in one key or value, the output rows attending to it). The saved copy has it poison
its 1×G group (scale = inf, the group dequantizes to NaN), so the gradients have NaN in the same rows as plain
SDPA's; where plain SDPA's NaN is confined to the one channel (a masked key: 0 · NaN in the matmul), it covers
that channel's 1×G group. Other batches and heads stay finite.

Autograd and ``torch.compile``: the custom ops ``fp8coat::attention`` (forward: ``(out, q_q, q_s, k_q, k_s, v_q,
v_s)``) and ``fp8coat::attention_backward`` with fake implementations and ``register_autograd``, like the other
FP8 ops, registered with ``eager.register_eager``; dynamo sees two opaque nodes, so a compiled layer stays one
graph. Inside a custom op autograd does not record (the dispatcher runs it below the autograd key), so the backward
takes the vector-Jacobian product with ``torch.func.vjp`` — autograd at its own functorch level, the same
derivative formulas as ``torch.autograd.grad`` — which works both there and in eager mode.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._grid import cdiv
from ..formats import E4M3
from ..quantization import check_group_size, dequantize_per_group, quantize_per_group, resolve_backend
from .eager import call, register_eager

__all__ = ["fp8_attention", "fp8_attention_with_saved"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, enable_gqa: bool, group_size: int):
    check_group_size(group_size)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, S, D); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, h, _, d), (bk, hk, sk, dk), (bv, hv, sv, _) = q.shape, k.shape, v.shape
    heads_ok = hk == h or (enable_gqa and hk > 0 and h % hk == 0)
    if not (b == bk == bv and hk == hv and sk == sv and dk == d and heads_ok):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, k/v heads and "
                         "sequence must match and the head dims of q and k agree; fewer k/v heads need "
                         "enable_gqa=True and must divide the query heads")
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("fp8_attention returns no gradient for attn_mask; pass a mask that needs none")


def _sdpa(q, k, v, attn_mask, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


# ---------------------------------------------------------------------------------------------------------------
# custom ops


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  is_causal: bool, scale: float | None, enable_gqa: bool, group_size: int, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    with torch.no_grad():
        out = _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    saved = []
    for t in (q, k, v):
        t_q, t_s = quantize_per_group(t, E4M3, group_size, backend=backend)
        saved += [t_q, t_s.contiguous()]
    return (out, *saved)


_attention_op = torch.library.custom_op("fp8coat::attention", _forward_impl, mutates_args=())


def _fake_saved(t: torch.Tensor, group_size: int):
    return (t.new_empty(t.shape, dtype=E4M3.dtype),
            t.new_empty((*t.shape[:-1], cdiv(t.shape[-1], group_size)), dtype=torch.float32))


@_attention_op.register_fake
def _(q, k, v, attn_mask, is_causal, scale, enable_gqa, group_size, backend):
    out = _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa)  # fake SDPA: its output's shape and strides
    return (out, *_fake_saved(q, group_size), *_fake_saved(k, group_size), *_fake_saved(v, group_size))


def _backward_impl(d_out: torch.Tensor, q_q: torch.Tensor, q_s: torch.Tensor, k_q: torch.Tensor,
                   k_s: torch.Tensor, v_q: torch.Tensor, v_s: torch.Tensor, attn_mask: torch.Tensor | None,
                   is_causal: bool, scale: float | None, enable_gqa: bool, group_size: int, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = d_out.dtype
    q, k, v = (dequantize_per_group(t_q, t_s, group_size, dtype, backend=backend)
               for t_q, t_s in ((q_q, q_s), (k_q, k_s), (v_q, v_s)))
    _, vjp = torch.func.vjp(functools.partial(_sdpa, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa), q, k, v)
    return tuple(g.contiguous() for g in vjp(d_out))


_attention_backward_op = torch.library.custom_op("fp8coat::attention_backward", _backward_impl, mutates_args=())


@_attention_backward_op.register_fake
def _(d_out, q_q, q_s, k_q, k_s, v_q, v_s, attn_mask, is_causal, scale, enable_gqa, group_size, backend):
    return (d_out.new_empty(q_q.shape), d_out.new_empty(k_q.shape), d_out.new_empty(v_q.shape))


def _setup_context(ctx, inputs, output):
    attn_mask = inputs[3]
    saved = output[1:]  # q_q, q_s, k_q, k_s, v_q, v_s
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero tensors for the FP8 outputs' (absent) gradients
    ctx.save_for_backward(*saved, attn_mask)
    ctx.args = inputs[4:]  # is_causal, scale, enable_gqa, group_size, backend


def _attention_backward(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv = (_bwd or _attention_backward_op)(d_out, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("fp8coat::attention", _attention_backward, setup_context=_setup_context)
register_eager(_attention_op, _forward_impl, _setup_context,
               functools.partial(_attention_backward, _bwd=_backward_impl))


# ---------------------------------------------------------------------------------------------------------------
# public API


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  group_size: int = 16, backend: str | None = None) -> torch.Tensor:
    """SDPA (no dropout) whose backward keeps q, k, v only as FP8 E4M3 1×G copies and recomputes the attention."""
    return fp8_attention_with_saved(q, k, v, attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                    group_size=group_size, backend=backend)[0]


def fp8_attention_with_saved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             attn_mask: torch.Tensor | None = None, *, is_causal: bool = False,
                             scale: float | None = None, enable_gqa: bool = False, group_size: int = 16,
                             backend: str | None = None):
    """:func:`fp8_attention` returning ``(out, q_q, q_s, k_q, k_s, v_q, v_s)``: the output and the FP8 tensors its
    backward keeps."""
    _check(q, k, v, attn_mask, enable_gqa, group_size)
    return call(_attention_op, q, k, v, attn_mask, bool(is_causal), None if scale is None else float(scale),
                bool(enable_gqa), group_size, resolve_backend(q, backend))
