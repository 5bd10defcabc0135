"""Triton helpers shared by fp8coat's kernels (quantization, norms, activations, recompute, optimizer step).

Each ``@triton.jit`` helper here is the one Triton form of a rule that has a torch twin in the references:

    abs_nan_to_inf      |x| with NaN -> +inf                     (quantization.reference.abs_for_amax)
    clamp_cast          fp8(clamp(y, -FMAX, FMAX)), NaN kept      (quantization.reference.quantize_with_scale)
    recip_rn            1 / x, one IEEE division                  (_numerics.recip)
    floor_min_scale     max(s, 2^-126)                           (quantization.reference.floor_min_scale)
    scale_from_amax_tl  max(amax / FMAX, 2^-126)                 (quantization.reference.scale_from_amax)
    group_quant_store   per-1×G quantization of a tile            (quantization.reference.quantize_per_group)
    group_dequant_load  fp32(q) · s per 1×G group                 (quantization.reference.dequantize_per_group)
    mix32               murmur3's 32-bit finalizer                (quantization.reference.mix32)
    act_tl, act_grad_tl the activation formulas                   (ops.activation_math.act_torch, act_grad_torch)

plus the host-side switches of the kernels' math library (:func:`use_libdevice`, :func:`on_gpu`). Module-level
values used inside kernels are ``tl.constexpr``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .ops import activation_math as _am
from .quantization.reference import MIN_SCALE as _MIN_SCALE

try:  # the precise exp/erf of CUDA's math library (tl.exp lowers to the approximate ex2 instruction)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

__all__ = [
    "MIN_SCALE",
    "abs_nan_to_inf",
    "act_grad_tl",
    "act_tl",
    "clamp_cast",
    "floor_min_scale",
    "group_dequant",
    "group_dequant_load",
    "group_quant_store",
    "interpreting",
    "libdevice",
    "mix32",
    "on_gpu",
    "recip_rn",
    "scale_from_amax_tl",
    "use_libdevice",
]

MIN_SCALE = tl.constexpr(_MIN_SCALE)  # 2^-126, the floor of every scale
SQRT1_2 = tl.constexpr(_am.SQRT1_2)
INV_SQRT_2PI = tl.constexpr(_am.INV_SQRT_2PI)
K2 = tl.constexpr(_am.K2)
C = tl.constexpr(_am.C)
C3 = tl.constexpr(_am.C3)
TANH_CLAMP = tl.constexpr(_am.TANH_CLAMP)
KQ = tl.constexpr(_am.KQ)
EXP = tl.constexpr(0)  # _libm's functions
ERF = tl.constexpr(1)


def interpreting() -> bool:
    """Kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_gpu(device: torch.device) -> bool:
    """Kernels for tensors on ``device`` are compiled for a GPU (not run by the interpreter)."""
    return device.type == "cuda" and not interpreting()


def use_libdevice(x: torch.Tensor) -> bool:
    """The ``LIBDEVICE`` constexpr for kernels on ``x``: CUDA's precise exp/erf where compiled for the GPU."""
    return libdevice is not None and on_gpu(x.device)


# ---------------------------------------------------------------------------------------------------------------
# quantization arithmetic


@triton.jit
def abs_nan_to_inf(x):
    a = tl.abs(x)
    return tl.where(a != a, float("inf"), a)  # noqa: PLR0124 (NaN test)


@triton.jit
def fold_tile_amax(y, mask, amax_ptr):
    """Folds the max of ``|y|`` over the 2-D tile's ``mask``ed elements (NaN counts as +inf) into the int32 slot
    ``amax_ptr``, zeroed before the launch: non-negative floats order like their int32 bit patterns, so an integer
    atomic max leaves the bits of the amax of every tile of the launch. A program whose tile max the slot already
    reaches (most of a large launch, once a few tiles are in) skips the atomic."""
    a = tl.where(mask, abs_nan_to_inf(y.to(tl.float32)), 0.0)
    bits = tl.max(tl.max(a, axis=1), axis=0).to(tl.int32, bitcast=True)
    if bits > tl.load(amax_ptr):
        tl.atomic_max(amax_ptr, bits)


@triton.jit
def clamp_cast(y, FMAX: tl.constexpr, out_ty: tl.constexpr):
    # tl.where keeps NaN (tl.minimum/maximum may drop it)
    y = tl.where(y > FMAX, FMAX, y)
    y = tl.where(y < -FMAX, -FMAX, y)
    return y.to(out_ty)


@triton.jit
def recip_rn(x):
    """``1 / x`` elementwise in fp32, one IEEE division."""
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def floor_min_scale(s):
    """``max(s, 2^-126)`` (NaN stays NaN): keeps ``1/s`` finite."""
    return tl.where(s < MIN_SCALE, MIN_SCALE, s)


@triton.jit
def scale_from_amax_tl(amax, FMAX: tl.constexpr):
    """``max(amax / FMAX, 2^-126)`` (IEEE division)."""
    return floor_min_scale(tl.div_rn(amax, FMAX))


@triton.jit
def group_quant_store(x, q_ptr, s_ptr, rows, cols, mask, pid_k, R, K, NG,
                      FMAX: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-1×G quantization of the fp32 tile ``x`` (BLOCK_R × BLOCK_K, masked lanes hold 0) at tile column
    ``pid_k``; stores q into (R, K) and the scales into (R, NG), both contiguous."""
    x3 = tl.reshape(x, (BLOCK_R, BLOCK_K // G, G))
    s = scale_from_amax_tl(tl.max(abs_nan_to_inf(x3), axis=2), FMAX)
    inv = recip_rn(s)
    y = tl.reshape(x3 * inv[:, :, None], (BLOCK_R, BLOCK_K))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], clamp_cast(y, FMAX, q_ptr.dtype.element_ty), mask=mask)
    gcols = pid_k * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
    tl.store(s_ptr + rows[:, None] * NG + gcols[None, :], s, mask=(rows[:, None] < R) & (gcols[None, :] < NG))


@triton.jit
def group_dequant(q, s_ptr, rows, pid_k, R, NG, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``q · s`` for the fp32 tile ``q`` (BLOCK_R × BLOCK_K at tile column ``pid_k``) with its per-1×G scales
    read from the contiguous (R, NG) ``s_ptr`` (1.0 outside)."""
    gcols = pid_k * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
    s = tl.load(s_ptr + rows[:, None] * NG + gcols[None, :], mask=(rows[:, None] < R) & (gcols[None, :] < NG),
                other=1.0)
    return tl.reshape(tl.reshape(q, (BLOCK_R, BLOCK_K // G, G)) * s[:, :, None], (BLOCK_R, BLOCK_K))


@triton.jit
def group_dequant_load(q_ptr, s_ptr, rows, cols, mask, pid_k, R, K, NG,
                       G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 tile ``fp32(q) · s`` of the contiguous (R, K) FP8 ``q_ptr`` and its (R, NG) scales (masked
    lanes 0)."""
    q = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return group_dequant(q, s_ptr, rows, pid_k, R, NG, G, BLOCK_R, BLOCK_K)


@triton.jit
def mix32(x):
    """murmur3's 32-bit finalizer on uint32 (a bijection with full avalanche)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


# ---------------------------------------------------------------------------------------------------------------
# activation formulas (fp32, the evaluation order of ops.activation_math)


@triton.jit
def _libm(x, FN: tl.constexpr, LIBDEVICE: tl.constexpr):
    """exp (FN = EXP) or erf (FN = ERF) in fp32: CUDA's libdevice with LIBDEVICE, Triton's own otherwise."""
    if LIBDEVICE:
        if FN == EXP:
            y = libdevice.exp(x)
        else:
            y = libdevice.erf(x)
    else:
        if FN == EXP:
            y = tl.exp(x)
        else:
            y = tl.erf(x)
    return y


@triton.jit
def act_tl(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """f(x) for the activation code ``ACT`` (``activation_math.ACTIVATIONS``)."""
    if ACT == 0:
        y = x * recip_rn(1.0 + _libm(-x, EXP, LIBDEVICE))
    elif ACT == 1:
        y = x * (0.5 * (1.0 + _libm(x * SQRT1_2, ERF, LIBDEVICE)))
    elif ACT == 3:
        y = x * recip_rn(1.0 + _libm(-(x * KQ), EXP, LIBDEVICE))
    else:
        z2 = (x + C * (x * x * x)) * K2
        y = x * recip_rn(1.0 + _libm(-z2, EXP, LIBDEVICE))
    return y


@triton.jit
def act_grad_tl(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """f'(x) for the activation code ``ACT``."""
    if ACT == 0:
        s = recip_rn(1.0 + _libm(-x, EXP, LIBDEVICE))
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + _libm(x * SQRT1_2, ERF, LIBDEVICE))
        d = cdf + x * (_libm(x * x * -0.5, EXP, LIBDEVICE) * INV_SQRT_2PI)
    elif ACT == 3:
        z = x * KQ
        s = recip_rn(1.0 + _libm(-z, EXP, LIBDEVICE))
        d = s * (1.0 + z * (1.0 - s))
    else:
        x = tl.where(x > TANH_CLAMP, TANH_CLAMP, x)  # tl.where keeps NaN
        x = tl.where(x < -TANH_CLAMP, -TANH_CLAMP, x)
        z2 = (x + C * (x * x * x)) * K2
        e = _libm(-z2, EXP, LIBDEVICE)
        s = recip_rn(1.0 + e)
        d = s + x * (s * (e * s)) * (K2 * (1.0 + C3 * (x * x)))
    return d
