"""The activation formulas of the FP8-saving ops in fp32, as torch functions (the reference of
``ops.activations`` and ``ops.recompute``) and as the fp32 constants their Triton twins use
(``fp8coat._kernel_helpers.act_tl`` / ``act_grad_tl``). Only torch is imported here.

Codes (the kernels' ``ACT`` constexpr): 0 = silu, 1 = gelu (erf), 2 = gelu (tanh approximation), 3 = quick_gelu
(x · σ(1.702 · x), CLIP's and Qwen2-VL's vision MLPs); the evaluation order is documented in ``ops.activations``.
"""

from __future__ import annotations

import math

import torch

from .._numerics import f32, recip

__all__ = ["ACTIVATIONS", "C3", "INV_SQRT_2PI", "K2", "KQ", "SQRT1_2", "TANH_CLAMP", "C", "act_grad_torch",
           "act_torch"]

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}

SQRT1_2 = f32(math.sqrt(0.5))
INV_SQRT_2PI = f32(1.0 / math.sqrt(2.0 * math.pi))
K2 = f32(2.0 * math.sqrt(2.0 / math.pi))
C = f32(0.044715)
C3 = f32(3.0 * 0.044715)
TANH_CLAMP = 9.0
KQ = f32(1.702)  # quick_gelu's sigmoid slope


def act_torch(x: torch.Tensor, act: int) -> torch.Tensor:
    """f(x) for fp32 ``x``."""
    if act == 0:
        return x * recip(1.0 + torch.exp(-x))
    if act == 1:
        return x * (0.5 * (1.0 + torch.erf(x * SQRT1_2)))
    if act == 3:
        return x * recip(1.0 + torch.exp(-(x * KQ)))
    z2 = (x + C * (x * x * x)) * K2
    return x * recip(1.0 + torch.exp(-z2))


def act_grad_torch(x: torch.Tensor, act: int) -> torch.Tensor:
    """f'(x) for fp32 ``x``."""
    if act == 0:
        s = recip(1.0 + torch.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    if act == 1:
        cdf = 0.5 * (1.0 + torch.erf(x * SQRT1_2))
        return cdf + x * (torch.exp(x * x * -0.5) * INV_SQRT_2PI)
    if act == 3:
        z = x * KQ
        s = recip(1.0 + torch.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    x = torch.clamp(x, -TANH_CLAMP, TANH_CLAMP)
    z2 = (x + C * (x * x * x)) * K2
    e = torch.exp(-z2)
    s = recip(1.0 + e)
    return s + x * (s * (e * s)) * (K2 * (1.0 + C3 * (x * x)))
