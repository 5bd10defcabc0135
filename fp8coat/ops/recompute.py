"""Rebuilding a linear layer's input in backward from what the op that produced it saved anyway.

A linear layer fed by an FP8 RMSNorm or SwiGLU saves nothing of its input: the producer already keeps its own
input in per-group FP8 (1×G E4M3, fp32 scales), and backward recomputes the linear input from that and quantizes
it, transposed, for the weight gradient:

    rmsnorm   src = [x_q, x_s, rstd(, w)]     x̂ = (fp32(x_q)·x_s · rstd) · w            (fp32, products rounded)
    layernorm src = [x_q, x_s, rstd, w, b]    x̂ = (fp32(x_q)·x_s · rstd) · w + b        (fp32, likewise; x_q holds
                                                                                          the centered input)
    swiglu    src = [g_q, g_s, u_q, u_s]      x̂ = silu(ĝ) · û,  silu(g) = g · 1/(1 + exp(-g))
    then      x̂ rounded to the linear input's dtype, quantized per tensor with the forward's scale s:
              qt = fp8(clamp(x̂ · (1/s)))ᵀ     (K, M_pad), zero beyond column M

x_q, g_q, u_q: (…, K) FP8; x_s, g_s, u_s: (…, ceil(K/G)) fp32; rstd: (…,) fp32; w, b: (K,). The torch
reference composes the library's primitives; the Triton kernel (``recompute_kernels``) does it in one pass for
``rmsnorm`` and ``swiglu``; ``layernorm`` on CUDA computes x̂ with the reference and quantizes it with the
quantize-transpose kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import get_format
from ..quantization import dequantize_per_group, quantize_transpose, resolve_backend
from .activation_math import ACTIVATIONS, act_torch

__all__ = ["RECOMPUTE_KINDS", "Recompute", "recompute_input", "recompute_quantized_t"]

_SOURCES = {"rmsnorm": (3, 4), "swiglu": (4,), "layernorm": (5,)}  # kind -> how many tensors it takes
RECOMPUTE_KINDS = tuple(_SOURCES)
_FUSED_KINDS = ("rmsnorm", "swiglu")  # kinds the one-pass Triton kernel computes


@dataclass(frozen=True)
class Recompute:
    """How to rebuild a linear layer's input in backward instead of saving it (see :func:`recompute_input`)."""

    kind: str
    tensors: tuple
    group_size: int = 16


def _check(kind: str, src) -> None:
    if kind not in RECOMPUTE_KINDS:
        raise ValueError(f"unknown recompute kind {kind!r}; expected one of {RECOMPUTE_KINDS}")
    expected = _SOURCES[kind]
    if len(src) not in expected:
        raise ValueError(f"recompute {kind!r} takes {' or '.join(map(str, expected))} tensors, got {len(src)}")


def recompute_input(kind: str, src: list[torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The linear input x̂ (…, K) in ``dtype``, computed in fp32 from the producer's FP8 tensors (reference)."""
    _check(kind, src)
    if kind == "rmsnorm":
        x = dequantize_per_group(src[0], src[1], group_size, torch.float32)
        y = x * src[2].float().unsqueeze(-1)
        if len(src) > 3:
            y = y * src[3].float()
        return y.to(dtype)
    if kind == "layernorm":
        x = dequantize_per_group(src[0], src[1], group_size, torch.float32)
        y = x * src[2].float().unsqueeze(-1)
        return (y * src[3].float() + src[4].float()).to(dtype)
    g = dequantize_per_group(src[0], src[1], group_size, torch.float32)
    u = dequantize_per_group(src[2], src[3], group_size, torch.float32)
    return (act_torch(g, ACTIVATIONS["silu"]) * u).to(dtype)


def recompute_quantized_t(
    kind: str, src: list[torch.Tensor], group_size: int, dtype: torch.dtype, scale: torch.Tensor, fmt="e4m3",
    *, backend: str | None = None, fused: bool = True,
) -> torch.Tensor:
    """``qt`` (K, M_pad) FP8: the recomputed input quantized with ``scale`` (0-d fp32) and transposed.

    ``backend``: None = Triton on CUDA, torch elsewhere. ``fused=False`` (Triton only) writes x̂ in ``dtype``
    first and quantizes it with the quantize-transpose kernel (two launches, same result).
    """
    _check(kind, src)
    fmt = get_format(fmt)
    k = src[0].shape[-1]
    resolved = resolve_backend(src[0], backend)
    if resolved == "triton" and kind in _FUSED_KINDS:
        from .recompute_kernels import recompute_quantized_t_triton

        return recompute_quantized_t_triton(kind, src, group_size, dtype, scale, fmt, fused=fused)
    x = recompute_input(kind, src, group_size, dtype).reshape(-1, k)
    return quantize_transpose(x, fmt, scale, rowwise=False, backend=resolved)[1]
