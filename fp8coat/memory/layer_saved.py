"""Bytes a forward pass keeps for backward, from formulas: one decoder layer, and the rest of the model.

Each function returns ``{autograd op name: bytes}`` with the names and the counting rules of
:func:`fp8coat.memory.measure_saved_tensors` (unique storages; parameters apart), so that on the CPU the two agree
exactly. Sizes: B batch, S sequence, T = B·S tokens, Tp = T rounded up to a multiple of 16, H hidden, I MLP size,
Hq / Hkv query / key-value heads, D head dim, V vocabulary, G = 16 (1×G groups of FP8-saved activations).

Precision modes (how ``fp8coat train`` runs the model):

* ``bf16``: bf16 parameters and activations;
* ``fp32``: fp32 parameters and activations (FP8 recipes with fp32 master weights: the FP8 GEMMs take and return
  fp32);
* ``amp``: fp32 parameters under bf16 autocast (the ``bf16`` recipe with fp32 parameters): the residual stream and
  the norms stay fp32, every linear layer saves its own bf16 copy of its input and of its weight.

What one decoder layer saves, per recipe (bytes; ``a`` = activation bytes per element, 2 or 4):

==========================  ==============================  ==============================  ========================
part                        ``bf16``                        ``fp8-linear``                  ``coat``
==========================  ==============================  ==============================  ========================
each RMSNorm (rows R, W)    fp32 input R·W·4 (Pow), rstd    as ``bf16``                     x FP8 R·W + fp32 scales
                            R·4 (Rsqrt), normalized input                                   R·ceil(W/G)·4 + rstd R·4
                            in the input dtype (Mul)
q/k/v (one shared input)    T·H·a (Mm)                      FP8 transposed input H·Tp       nothing (rebuilt from
                                                            + fp32 scales                   the norm's FP8 input)
attention (SDPA)            q, out B·Hq·S·D·a; k, v B·Hkv·S·D·a; log-sum-exp B·Hq·S fp32 (CUDA: + two int64)
                            ``coat`` with ``fp8_attention``: q, k, v FP8 (B·Hq + 2·B·Hkv)·S·D + fp32 scales
                            (B·Hq + 2·B·Hkv)·S·ceil(D/G)·4, nothing else (``fp8coat.ops.attention``)
o projection                nothing (its input is SDPA's     FP8 transposed input Hq·D·Tp    as ``fp8-linear``
                            output)
gate/up (one shared input)  T·H·a (Mm)                      FP8 transposed input H·Tp       nothing (rebuilt)
SiLU, product               gate T·I·a (Silu), silu(gate)   as ``bf16``                     gate and up FP8 2·T·I
                            and up 2·T·I·a (Mul)                                            + scales 2·T·ceil(I/G)·4
down                        T·I·a (Mm)                      FP8 transposed input I·Tp       nothing (rebuilt)
==========================  ==============================  ==============================  ========================

Every FP8 linear op also keeps its fp32 input scale and one fp32 scale per weight (4 bytes each). RoPE's cos and
sin (2·S·D in the residual dtype) are shared by all layers and counted once, in :func:`rest_saved_bytes`.

Attention: on CUDA a bf16 SDPA runs cuDNN attention (``ScaledDotProductCudnnAttention``: log-sum-exp B·Hq·S fp32
plus a philox seed and offset, int64 scalars); fp32 runs the memory-efficient kernel (log-sum-exp padded to 32
rows); on the CPU the flash kernel for CPU. Grouped-query attention keeps k and v at Hkv heads (``enable_gqa``).
``compiled=True`` models ``torch.compile`` of a ``bf16``-recipe layer in bf16 precision: the partitioner keeps the
layer input, three T·H and three T·I bf16 tensors, both rstd and the attention's tensors (measured on the CPU and,
as allocated memory, on the H200); FP8 recipes save the same compiled (their ops are opaque custom ops). ``amp``
compiled: the eager numbers without the bf16 casts of the weights (the partitioner recomputes them from the fp32
parameters in backward) and with one cast per shared input (q/k/v, gate/up) — derived from, and within 0.96–1.00×
of, the peaks of the full Llama-2-7B compiled under autocast on the H200 (``docs/results/llama7b/``), not from a CPU
count (the CPU partitioner recomputes more). ``fp32`` compiled is given its eager numbers.
"""

from __future__ import annotations

from collections import Counter

from .._grid import cdiv, padded
from .model_shape import ModelShape

__all__ = ["DEVICES", "PRECISIONS", "RECIPE_NAMES", "layer_saved_bytes", "rest_saved_bytes", "rope_saved_bytes",
           "attention_saved_bytes", "checkpointed_layer_bytes"]

RECIPE_NAMES = ("bf16", "fp8-linear", "coat")
COMPILED_OP = "CompiledFunction"  # the op name under which a compiled layer's saved tensors are counted
PRECISIONS = ("bf16", "fp32", "amp")
DEVICES = ("cuda", "cpu")
ACT_GROUP = 16  # 1×G groups of FP8-saved activations (Recipe.activation_group_size)
FP8_OP = "_EagerOpBackward"  # autograd node of fp8coat's custom ops in eager mode


def _check(recipe: str, precision: str, device: str) -> None:
    if recipe not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPE_NAMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if precision == "amp" and recipe != "bf16":
        raise ValueError("precision 'amp' (bf16 autocast over fp32 parameters) is the bf16 recipe's; FP8 recipes "
                         "run fp32 parameters without autocast ('fp32')")


def _residual_bytes(precision: str) -> int:
    """Bytes per element of the residual stream (embedding output, norm inputs, layer outputs)."""
    return 2 if precision == "bf16" else 4


def _linear_out_bytes(precision: str) -> int:
    """Bytes per element of a linear layer's output (bf16 under autocast)."""
    return 4 if precision == "fp32" else 2


def _hf_rmsnorm(out: Counter, rows: int, width: int, in_bytes: int) -> None:
    """HF ``LlamaRMSNorm`` (x.float(), pow, mean, rsqrt, mul, cast back, weight ·): the fp32 input (Pow), rstd
    (Rsqrt) and the normalized input in the input's dtype (Mul)."""
    out["Pow"] += rows * width * 4
    out["Rsqrt"] += rows * 4
    out["Mul"] += rows * width * in_bytes


def _fp8_rmsnorm(out: Counter, rows: int, width: int) -> None:
    """``fp8coat.ops.norms.rmsnorm``: x as E4M3 (1 byte), fp32 per-group scales and fp32 rstd."""
    out[FP8_OP] += rows * width + rows * cdiv(width, ACT_GROUP) * 4 + rows * 4


def attention_saved_bytes(shape: ModelShape, batch: int, seq: int, *, device: str = "cuda",
                          precision: str = "bf16", fp8_attention: bool = False) -> "dict[str, int]":
    """What SDPA keeps: q and the output (B, Hq, S, D), k and v (B, Hkv, S, D) in the attention dtype (bf16 under
    autocast), the fp32 log-sum-exp (B, Hq, S) (CUDA fp32: rows padded to 32) and, on CUDA, two int64 scalars.
    ``fp8_attention`` (``Recipe.fp8_attention``): q, k, v as E4M3 with fp32 1×G scales, on any device and
    precision, and nothing else."""
    b, s, d = batch, seq, shape.head_dim
    if fp8_attention:
        return {FP8_OP: (shape.heads + 2 * shape.kv_heads) * b * s * (d + 4 * cdiv(d, ACT_GROUP))}
    e = 4 if precision == "fp32" else 2
    tensors = (2 * shape.heads + 2 * shape.kv_heads) * b * s * d * e
    if device == "cpu":
        return {"ScaledDotProductFlashAttentionForCpu": tensors + b * shape.heads * s * 4}
    if e == 2:
        return {"ScaledDotProductCudnnAttention": tensors + b * shape.heads * s * 4 + 16}
    return {"ScaledDotProductEfficientAttention": tensors + b * shape.heads * cdiv(s, 32) * 32 * 4 + 16}


def _linear_op(bias: bool) -> str:
    return "Addmm" if bias else "Mm"


def layer_saved_bytes(shape: ModelShape, recipe: str, batch: int, seq: int, *, device: str = "cuda",
                      precision: str = "bf16", compiled: bool = False, fp8_attention: bool = False
                      ) -> "dict[str, int]":
    """``{op: bytes}`` one decoder layer keeps for backward (RoPE's shared cos/sin excluded); see the module
    docstring for the formulas. ``fp8_attention``: ``Recipe.fp8_attention`` (``coat`` only)."""
    _check(recipe, precision, device)
    if fp8_attention and recipe != "coat":
        raise ValueError(f"fp8_attention is an option of the coat recipe, not of {recipe!r}")
    t, tp = batch * seq, padded(batch * seq, 16)
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    r, a = _residual_bytes(precision), _linear_out_bytes(precision)
    attention = attention_saved_bytes(shape, batch, seq, device=device, precision=precision,
                                      fp8_attention=fp8_attention)
    out: Counter = Counter()
    if compiled and recipe == "bf16" and precision == "bf16":
        out[COMPILED_OP] = 4 * t * h * a + 3 * t * i * a + 2 * t * 4 + sum(attention.values())
        return dict(out)
    amp = precision == "amp"
    # attention block
    if recipe == "coat":
        _fp8_rmsnorm(out, t, h)
        out[FP8_OP] += 4 * (1 + 3)  # q/k/v: input scale + 3 weight scales (the input is rebuilt from the norm's)
    else:
        _hf_rmsnorm(out, t, h, r)
        if recipe == "fp8-linear":
            out[FP8_OP] += h * tp + 4 * (1 + 3)
        elif amp and compiled:  # one bf16 cast of the shared input; the weights' casts are recomputed
            out[COMPILED_OP] += t * h * 2
        elif amp:  # each projection saves its own bf16 casts of its input and its weight
            out[_linear_op(shape.qkv_bias)] += 3 * t * h * 2 + (shape.q_out + 2 * shape.kv_out) * h * 2
        else:
            out[_linear_op(shape.qkv_bias)] += t * h * a
    if shape.qk_norm:  # per-head RMSNorms of q and k (rows T·heads, width D), on the projections' outputs
        for heads in (shape.heads, shape.kv_heads):
            if recipe == "coat":
                _fp8_rmsnorm(out, t * heads, d)
            else:
                _hf_rmsnorm(out, t * heads, d, a)
    for op, nbytes in attention.items():
        out[op] += nbytes
    if recipe == "bf16":
        if amp and not compiled:  # o_proj's input is SDPA's bf16 output (kept by SDPA); its weight cast is new
            out[_linear_op(shape.o_bias)] += h * shape.q_out * 2
    else:
        out[FP8_OP] += shape.q_out * tp + 4 * 2
    # MLP block
    if recipe == "coat":
        _fp8_rmsnorm(out, t, h)
        out[FP8_OP] += 4 * (1 + 2) + 2 * (t * i + t * cdiv(i, ACT_GROUP) * 4) + 4 * 2  # gate/up, SwiGLU, down
        return dict(out)
    _hf_rmsnorm(out, t, h, r)
    mm = _linear_op(shape.mlp_bias)
    if recipe == "fp8-linear":
        out[FP8_OP] += h * tp + 4 * (1 + 2) + i * tp + 4 * 2
    elif amp and compiled:  # one cast of the shared gate/up input, the down projection's input cast
        out[COMPILED_OP] += t * h * 2 + t * i * 2
    elif amp:
        out[mm] += 2 * (t * h * 2 + i * h * 2) + t * i * 2 + h * i * 2
    else:
        out[mm] += t * h * a + t * i * a
    out["Silu"] += t * i * a
    out["Mul"] += 2 * t * i * a
    return dict(out)


def checkpointed_layer_bytes(shape: ModelShape, batch: int, seq: int, *, precision: str = "bf16"
                             ) -> "dict[str, int]":
    """A decoder layer under non-reentrant activation checkpointing keeps only its input (T·H in the residual
    dtype); the rest is recomputed in its backward."""
    return {"Checkpoint (inputs)": batch * seq * shape.hidden * _residual_bytes(precision)}


def rope_saved_bytes(shape: ModelShape, seq: int, *, precision: str = "bf16") -> "dict[str, int]":
    """RoPE's cos and sin, (1, S, D) each in the residual dtype, kept by every layer's q·cos and rot(q)·sin: one
    pair for the whole model."""
    return {"Mul": 2 * seq * shape.head_dim * _residual_bytes(precision)}


def rest_saved_bytes(shape: ModelShape, batch: int, seq: int, *, precision: str = "bf16", chunked_loss: bool = True,
                     checkpointing: bool = False) -> "dict[str, int]":
    """``{op: bytes}`` kept outside the decoder layers by a training step of ``fp8coat train``: the embedding's
    token ids (int64), RoPE's cos/sin (not with checkpointing: they are then arguments of the checkpointed
    layers), the final RMSNorm (never converted), and the LM head with the loss:

    * chunked (``fp8coat.ops.cross_entropy.linear_cross_entropy``): the gradients it computed in forward,
      d_hidden (T·H, hidden's dtype) and d_weight (V·H, the weight's dtype);
    * plain (``F.cross_entropy(logits.float(), y)``): the head's input (bf16 casts of input and weight under
      autocast), log_softmax's fp32 output (T·V·4), the int64 targets and the fp32 total weight.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    t, h, v = batch * seq, shape.hidden, shape.vocab
    r = _residual_bytes(precision)
    out: Counter = Counter({"Embedding": t * 8})
    if not checkpointing:
        out.update(rope_saved_bytes(shape, seq, precision=precision))
    _hf_rmsnorm(out, t, h, r)
    if chunked_loss:
        out[FP8_OP] += t * h * r + v * h * (2 if precision == "bf16" else 4)
        return dict(out)
    out["Mm"] += t * h * 2 + v * h * 2 if precision == "amp" else t * h * r
    out["LogSoftmax"] += t * v * 4
    out["NllLoss"] += t * 8 + 4
    return dict(out)
