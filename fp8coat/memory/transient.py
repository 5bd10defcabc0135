"""Transient memory of a training step: the loss's buffers and the workspace of one decoder layer's backward.

These are estimates from the tensor sizes each step allocates (not exact counts):

* :func:`loss_transients`: above what the loss keeps for backward, the largest extra bytes alive in its forward
  (plain: the logits and their fp32 copy next to log_softmax's output; chunked: the final norm's output, the fp32
  d_weight accumulator and one chunk's logits) and in its backward (plain: the fp32 gradients of log_softmax's
  output and input; chunked: the scaled d_hidden and d_weight).
* :func:`layer_backward_workspace`: one decoder layer's backward replayed as a sequence of allocations and frees
  (incoming gradient, per op the gradients it makes and its temporaries — FP8 GEMM operands G8, G8ᵀ, Wᵀ8 and the
  rebuilt X8ᵀ, the attention's gradients and fp32 dq accumulator; with ``fp8_attention`` also the dequantized q, k,
  v and the recomputed output and log-sum-exp — and the saved tensors released after each op);
  returns the largest level reached above "the layer's saved tensors held". The layer's parameter gradients are
  included (the caller subtracts nothing for them).
"""

from __future__ import annotations

from .._grid import cdiv, padded
from .layer_saved import ACT_GROUP, attention_saved_bytes
from .model_shape import ModelShape

__all__ = ["layer_backward_workspace", "loss_transients"]


def _default_chunk(vocab: int, bytes_per_logit: int) -> int:
    from ..ops.cross_entropy import default_chunk

    return default_chunk(vocab, bytes_per_logit)


def loss_transients(shape: ModelShape, batch: int, seq: int, *, precision: str, chunked: bool, device: str,
                    chunk_tokens: "int | None" = None) -> "tuple[int, int]":
    """``(forward extra, backward extra)`` bytes of the loss beyond what it saves (see the module docstring)."""
    t, h, v = batch * seq, shape.hidden, shape.vocab
    r = 2 if precision == "bf16" else 4  # hidden / residual dtype
    p = 2 if precision == "bf16" else 4  # weight dtype
    logits = 4 if precision == "fp32" else 2  # bf16 under autocast
    if not chunked:
        forward = t * v * logits + (t * v * 4 if logits != 4 else 0)
        return forward, 2 * t * v * 4
    fused = device == "cuda"
    chunk = chunk_tokens or _default_chunk(v, r if fused else 4)
    c = min(chunk, t)
    acc = v * h * 4 if t > chunk else 0
    work = c * v * logits + (0 if fused else c * v * 4 + c * v * logits) + c * h * logits
    forward = t * h * r + max(acc + work - v * h * p, acc if p != 4 else 0)
    return forward, t * h * r + v * h * p


class _Timeline:
    """Running sum of allocations minus frees, and its maximum."""

    def __init__(self):
        self.level = 0
        self.peak = 0

    def alloc(self, *sizes: int) -> None:
        self.level += sum(sizes)
        self.peak = max(self.peak, self.level)

    def free(self, *sizes: int) -> None:
        self.level -= sum(sizes)


def _fp8_linear_bwd(tl: _Timeline, t: int, k: int, n: int, a: int, p: int, rebuilt: bool, extra: int) -> None:
    """FP8 linears on one input (K) with outputs summing to N: G8 and G8ᵀ (T·N, N·Tp), Wᵀ8 (K·N), the rebuilt
    X8ᵀ (K·Tp, plus ``extra`` bytes of temporaries where the torch reference rebuilds it), dX and dW."""
    tp = padded(t, 16)
    temps = t * n + n * tp + k * n + (k * tp + extra if rebuilt else 0)
    tl.alloc(temps)
    tl.alloc(t * k * a, n * k * p)
    tl.free(temps)


def _bf16_linears_bwd(tl: _Timeline, t: int, k: int, ns: "list[int]", a: int, p: int) -> None:
    """Plain linears on one input: dX of each (summed as they come) and dW."""
    for j, n in enumerate(ns):
        tl.alloc(t * k * a, n * k * p)
        if j:
            tl.alloc(t * k * a)
            tl.free(2 * t * k * a)


def _norm_bwd(tl: _Timeline, rows: int, width: int, fp8: bool, cpu: bool, r: int, p: int, saved: int) -> None:
    """RMSNorm backward: fp32 temporaries (the HF norm's autograd chain; the torch reference of the FP8 norm on the
    CPU), dX in the residual dtype and dw; frees its saved tensors."""
    temps = 0 if fp8 and not cpu else 2 * rows * width * 4
    tl.alloc(temps, rows * width * r, width * p)
    tl.free(temps, saved)


def layer_backward_workspace(shape: ModelShape, recipe: str, batch: int, seq: int, *, precision: str = "bf16",
                             device: str = "cuda", grad_bytes: "int | None" = None, compiled: bool = False,
                             fp8_attention: bool = False) -> int:
    """Peak bytes above "the layer's saved tensors held" while one decoder layer runs its backward, incoming
    gradient and the layer's parameter gradients (``grad_bytes`` per element; default: the parameters' dtype)
    included. A compiled ``bf16``-recipe layer (one backward graph that frees each saved tensor after its last
    use) is approximated by the incoming gradient and the layer's gradients alone. ``fp8_attention``:
    ``Recipe.fp8_attention``, whose backward rebuilds q, k, v and reruns the attention forward first."""
    t = batch * seq
    tp = padded(t, 16)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_out, shape.kv_out
    r = 2 if precision == "bf16" else 4
    a = 4 if precision == "fp32" else 2
    p = grad_bytes if grad_bytes is not None else (2 if precision == "bf16" else 4)
    if compiled and recipe == "bf16" and precision == "bf16":
        return t * h * r + sum(w.numel for w in shape.layer_parameters()) * p
    cpu = device == "cpu"
    fp8, coat = recipe != "bf16", recipe == "coat"
    rebuild_extra = t * h * 4 if cpu else 0
    g = ACT_GROUP
    norm_saved = (t * h + t * cdiv(h, g) * 4 + t * 4) if coat else (t * h * 4 + t * 4 + t * h * r)
    tl = _Timeline()
    tl.alloc(t * h * r)  # dY, the incoming gradient (held for the MLP block's residual)
    # MLP
    if coat:
        _fp8_linear_bwd(tl, t, i, h, a, p, True, t * i * 4 if cpu else 0)  # down, rebuilt from SwiGLU's FP8
        tl.alloc(2 * t * i * a)  # SwiGLU backward: d_gate, d_up
        tl.free(t * i * a, 2 * (t * i + t * cdiv(i, g) * 4))
        _fp8_linear_bwd(tl, t, h, 2 * i, a, p, True, rebuild_extra)  # gate/up, rebuilt from the norm's FP8
        tl.free(2 * t * i * a)
    else:
        if fp8:
            _fp8_linear_bwd(tl, t, i, h, a, p, False, 0)
            tl.free(i * tp)
        else:
            tl.alloc(t * i * a, h * i * p)
            tl.free(t * i * a)
        tl.alloc(2 * t * i * a)  # product backward: d_act, d_up
        tl.free(t * i * a, 2 * t * i * a)
        tl.alloc(t * i * a)  # SiLU backward: d_gate
        tl.free(t * i * a, t * i * a)
        if fp8:
            _fp8_linear_bwd(tl, t, h, 2 * i, a, p, False, 0)
            tl.free(h * tp)
        else:
            _bf16_linears_bwd(tl, t, h, [i, i], a, p)
            tl.free(t * h * a)
        tl.free(2 * t * i * a)
    _norm_bwd(tl, t, h, coat, cpu, r, p, norm_saved)
    tl.free(t * h * a)
    tl.alloc(t * h * r)  # residual: dH = dY + d(norm input)
    tl.free(t * h * r, t * h * r)
    # attention
    if fp8:
        _fp8_linear_bwd(tl, t, q, h, a, p, False, 0)  # o_proj, from its saved X8ᵀ
        tl.free(q * tp)
    else:
        tl.alloc(t * q * a, h * q * p)
    e = 4 if precision == "fp32" else 2
    attn_saved = sum(attention_saved_bytes(shape, batch, seq, device=device, precision=precision,
                                           fp8_attention=fp8_attention).values())
    sdpa_temps = 0 if cpu else t * q * 4 + batch * shape.heads * seq * 4  # fp32 dq accumulator, softmax delta
    rebuilt = 0
    if fp8_attention:  # q̂, k̂, v̂ dequantized, the recomputed output and its log-sum-exp
        rebuilt = t * (q + 2 * kv) * e + t * q * e + batch * shape.heads * seq * 4
        tl.alloc(rebuilt)
    tl.alloc(t * (q + 2 * kv) * e, sdpa_temps)
    tl.free(sdpa_temps, rebuilt, t * q * a, attn_saved)
    tl.alloc(2 * t * (q + kv) * e)  # RoPE backward: dq·cos + rot(dq·sin), same for k
    tl.free(t * (q + kv) * e, t * (q + kv) * e)
    if shape.qk_norm:
        for heads in (shape.heads, shape.kv_heads):
            rows = t * heads
            saved = (rows * shape.head_dim + rows * cdiv(shape.head_dim, g) * 4 + rows * 4) if coat else \
                (rows * shape.head_dim * (4 + a) + rows * 4)
            _norm_bwd(tl, rows, shape.head_dim, coat, cpu, a, p, saved)
            tl.free(rows * shape.head_dim * e)
    tl.alloc(t * (q + 2 * kv) * a)  # the (B, S, heads·D) layout of the gradients the projections take
    tl.free(t * (q + 2 * kv) * e)
    if fp8:
        _fp8_linear_bwd(tl, t, h, q + 2 * kv, a, p, coat, rebuild_extra)
        if not coat:
            tl.free(h * tp)
    else:
        _bf16_linears_bwd(tl, t, h, [q, kv, kv], a, p)
        tl.free(t * h * a)
    tl.free(t * (q + 2 * kv) * a)
    _norm_bwd(tl, t, h, coat, cpu, r, p, norm_saved)
    tl.free(t * h * a)
    tl.alloc(t * h * r)  # dX = dH + d(norm input)
    return tl.peak
