"""Exactly-rounded fp32 helpers shared by the torch references.

torch does not always compute ``tensor / python_scalar`` (or ``python_scalar / tensor``) as one IEEE division:
on CUDA a CPU-scalar divisor becomes a multiplication by its reciprocal, and ``float / Tensor`` is
``reciprocal(t) * float`` everywhere. The references must match the Triton kernels (``tl.div_rn``) bit for bit,
so every division by or of a constant goes through :func:`ieee_div`.
"""

from __future__ import annotations

import torch


def ieee_div(a: "torch.Tensor | float", b: "torch.Tensor | float") -> torch.Tensor:
    """fp32 ``a / b`` rounded once (round-to-nearest-even); at least one argument must be a tensor."""
    ref = a if isinstance(a, torch.Tensor) else b
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(ref, a, dtype=torch.float32)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(ref, b, dtype=torch.float32)
    return torch.div(a.float(), b.float())


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root.

    torch's vectorized CPU ``sqrt`` for float32 is not correctly rounded (about 1 in 6 results is off by one
    ulp in torch 2.13); a float64 square root rounded to fp32 is (53 >= 2·24 + 2 makes the double rounding
    innocuous).
    """
    return torch.sqrt(x.double()).float()
