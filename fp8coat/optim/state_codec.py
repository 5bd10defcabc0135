"""FP8 storage of optimizer moments with dynamic range expansion (DRE) — torch reference.

A moment tensor ``x`` (fp32, shape ``(*lead, K)``) is split into 1×G groups along the last dim (G = 128 by
default; the last group of a row is partial when G does not divide K). Per group we keep

* ``absmax`` M  = max |x| over the group (fp32),
* ``expo``   k16 (uint8): the expansion exponent k = k16 / 16 (only with expansion on),

and the FP8 codes ``q`` (``x.shape``). With μ the smallest **non-zero** |x| of the group (zeros ignored) and
R = M / μ its dynamic range, expansion picks the largest k (a multiple of 1/16, 1/16 <= k <= 255/16) with
R^k <= T, T = fmax² / 2 (E4M3: 100352), and stores

    q = fp8( sign(x) · fmax · (|x| / M)^k )            dequantized  x = sign(q) · M · (|q| / fmax)^(1/k)

so the group's largest value maps to ±fmax, its smallest non-zero value to fmax / R^k >= 2 / fmax (inside the
subnormal range of both formats), exact zeros stay zero, and an all-zero group is exact. This is COAT's
``sign(x)·(|x|/g)^k / s`` map with its centre g = sqrt(M·μ) and scale s = (M/g)^k / fmax folded together: the
two forms are equal, and this one needs only (M, k) per group — 5 bytes instead of 3 floats. Two deliberate
differences from the original kernel: the minimum really ignores zeros (the original's warp reduction does
not), and k is capped at 255/16 (k16 fits a byte; a group with R = 1 maps all values to ±fmax exactly anyway).

Without expansion (``expand=False``) the codec is plain per-group absmax, exactly the quantization primitive
(``fp8coat.quantization.reference``): ``s = max(M / fmax, 2^-126)``, ``q = fp8(x · (1/s))``, ``x = q · s``.
With expansion, ``M`` enters ``1/M`` and the decode as ``max(M, 2^-126)`` so that all-zero and subnormal groups
stay finite (an all-zero group decodes to exact zeros).

Arithmetic is spelled out so that the Triton step kernel can reproduce it: one IEEE division per group for
1/M and 16/k16; per element a multiply, ``log2``, ``exp2`` and a clamp. ``log2``/``exp2`` are the only
operations whose last bit may differ between backends.
"""

from __future__ import annotations

import math

import torch

from .._grid import cdiv
from .._numerics import f32, ieee_div
from ..formats import FP8Format, get_format
from ..quantization.reference import (
    abs_for_amax,
    floor_min_scale,
    grouped,
    quantize_with_scale,
    scale_from_amax,
    ungrouped,
)

__all__ = [
    "EXPAND_STEPS",
    "EXPO_UNIT",
    "MAX_EXPO",
    "decode",
    "encode",
    "expand_constant",
    "group_count",
    "side_shape",
]

# the expansion exponent's fixed-point encoding, k = k16 · EXPO_UNIT (the Triton step kernel uses the same values)
EXPAND_STEPS = 16  # k is a multiple of 1/16 ...
EXPO_UNIT = 1.0 / EXPAND_STEPS  # ... = 0.0625 exactly
MAX_EXPO = 255  # k16 stored in uint8: 1 <= k16 <= 255


def expand_constant(fmt: FP8Format) -> float:
    """fp32 value of ``16 · log2(fmax² / 2)`` — the numerator of ``k16 = floor(C / log2 R)``."""
    return f32(EXPAND_STEPS * math.log2(fmt.max * fmt.max / 2.0))


def group_count(k: int, group_size: int) -> int:
    return cdiv(k, group_size)


def side_shape(shape: tuple[int, ...] | torch.Size, group_size: int) -> tuple[int, ...]:
    """Shape of the per-group side tensors for a state of ``shape``: ``(*shape[:-1], ceil(K / G))``."""
    shape = tuple(shape) or (1,)
    return (*shape[:-1], group_count(shape[-1], group_size))


def _clamp_max(y: torch.Tensor, fmax: float) -> torch.Tensor:
    return torch.where(y > fmax, torch.full_like(y, fmax), y)


def encode(
    x: torch.Tensor, fmt="e4m3", group_size: int = 128, expand: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Encode fp32 ``x`` ``(*lead, K)`` -> ``(q, absmax, expo)``.

    ``q``: ``x.shape`` in ``fmt.dtype``; ``absmax``: fp32 ``side_shape``; ``expo``: uint8 ``side_shape`` or None
    when ``expand`` is False.
    """
    fmt = get_format(fmt)
    k = x.shape[-1]
    xg = grouped(x.float(), group_size)
    a = abs_for_amax(xg)
    absmax = a.amax(dim=-1)
    if not expand:
        q = quantize_with_scale(xg, scale_from_amax(absmax, fmt).unsqueeze(-1), fmt)
        return ungrouped(q, k).contiguous(), absmax, None
    amin = torch.where(a > 0, a, torch.full_like(a, float("inf"))).amin(dim=-1)
    log_range = torch.log2(absmax) - torch.log2(amin)
    log_range = torch.where(log_range > 0, log_range, torch.zeros_like(log_range))  # R == 1, all-zero, non-finite
    k16 = torch.floor(ieee_div(expand_constant(fmt), log_range)).clamp(1, MAX_EXPO)
    expo_f = k16 * EXPO_UNIT  # exact
    r = a * ieee_div(1.0, floor_min_scale(absmax)).unsqueeze(-1)
    y = _clamp_max(fmt.max * torch.exp2(expo_f.unsqueeze(-1) * torch.log2(r)), fmt.max)
    y = torch.where(xg < 0, -y, y)
    return ungrouped(y.to(fmt.dtype), k).contiguous(), absmax, k16.to(torch.uint8)


def decode(
    q: torch.Tensor, absmax: torch.Tensor, expo: torch.Tensor | None, fmt="e4m3", group_size: int = 128
) -> torch.Tensor:
    """Inverse of :func:`encode`: fp32 tensor of ``q``'s shape."""
    fmt = get_format(fmt)
    k = q.shape[-1]
    qg = grouped(q.float(), group_size)
    if expo is None:
        x = qg * scale_from_amax(absmax, fmt).unsqueeze(-1)
    else:
        m = floor_min_scale(absmax.float()).unsqueeze(-1)
        inv_k = ieee_div(float(EXPAND_STEPS), expo.float()).unsqueeze(-1)
        mag = torch.exp2(torch.log2(qg.abs() * (1.0 / fmt.max)) * inv_k) * m
        x = torch.where(qg < 0, -mag, mag)
    return ungrouped(x, k).contiguous()
