"""Exactly-rounded helpers shared by the torch references.

torch does not always compute ``tensor / python_scalar`` (or ``python_scalar / tensor``) as one IEEE division:
on CUDA a CPU-scalar divisor becomes a multiplication by its reciprocal, and ``float / Tensor`` is
``reciprocal(t) * float`` everywhere. The references must match the Triton kernels (``tl.div_rn``) bit for bit,
so every division by or of a constant goes through :func:`ieee_div` (fp32) or :func:`div64` (fp64), and every
Python constant a kernel receives as fp32 is rounded once by :func:`f32`.
"""

from __future__ import annotations

import math
import struct

import torch

__all__ = ["div64", "f32", "ieee_div", "ieee_sqrt", "recip", "sqrt64"]

_F32 = struct.Struct("f")


def f32(x: float) -> float:
    """The Python float ``x`` rounded to the nearest fp32 value (round-to-nearest-even; ±inf beyond fp32's range)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # rounds to ±inf in fp32 (struct refuses to pack it)
        return math.copysign(math.inf, x)


def ieee_div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """fp32 ``a / b`` rounded once (round-to-nearest-even); at least one argument must be a tensor."""
    ref = a if isinstance(a, torch.Tensor) else b
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(ref, a, dtype=torch.float32)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(ref, b, dtype=torch.float32)
    return torch.div(a.float(), b.float())


def recip(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` elementwise in ``x``'s dtype, one IEEE division (``1 / tensor`` is a reciprocal instruction)."""
    return torch.div(torch.ones_like(x), x)


def div64(a: torch.Tensor, n: float) -> torch.Tensor:
    """``a / n`` for an fp64 tensor ``a`` as one IEEE division (tensor / python scalar is a reciprocal-multiply on
    CUDA)."""
    return torch.div(a, torch.full_like(a, float(n)))


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root.

    torch's vectorized CPU ``sqrt`` for float32 is not correctly rounded (about 1 in 6 results is off by one
    ulp in torch 2.13); a float64 square root rounded to fp32 is (53 >= 2·24 + 2 makes the double rounding
    innocuous).
    """
    return torch.sqrt(x.double()).float()


def sqrt64(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp64 square root: torch's vectorized CPU sqrt is not (~1% of float64 results are 1 ulp
    off), numpy's is."""
    if a.device.type == "cpu":
        import numpy as np

        with np.errstate(invalid="ignore"):
            return torch.from_numpy(np.sqrt(a.detach().contiguous().numpy()))
    return torch.sqrt(a)
