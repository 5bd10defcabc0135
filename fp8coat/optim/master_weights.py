"""Master-weight modes: where the exact (fp32) value of each parameter lives.

=====================  ============  ==========================================================================
mode                   param dtype   master copy
=====================  ============  ==========================================================================
``fp32``               fp32          the parameter itself (COAT parity)
``bf16-remainder``     bf16          the bf16 parameter holds the top 16 bits of the fp32 master, rounded to
                                     nearest; an int16 state holds the low 16 bits. The fp32 master is rebuilt
                                     exactly, so the update is bit-identical to an fp32-master run, at 4 bytes
                                     per parameter for param + remainder (8 B/param with bf16 grads, FP8 m, v).
``bf16-stochastic``    bf16          none: the fp32 update is rounded stochastically into bf16 (unbiased);
                                     the 16 random bits of each element are a hash of (step key, element
                                     offset) — :func:`random16` — identical in the torch and Triton steps.
``none``               any float     none: the fp32 update is rounded to nearest into the param dtype (what
                                     ``torch.optim.AdamW`` does for low-precision params).
=====================  ============  ==========================================================================

Split rule of ``bf16-remainder`` (fp32 bits ``b``, hi = b >> 16, lo = b & 0xFFFF):
``param_bits = hi + (lo >= 0x8000)`` (round half away from zero in magnitude) and ``remainder = lo``.
Join: ``hi = param_bits - (lo >= 0x8000)``; ``b = hi << 16 | lo``. Unambiguous for every finite fp32 value.

A bf16 parameter can also be written from outside the optimizer (pruning, masking: ``p.data[mask] = 0``) while its
remainder stays. The join then gives a value within half a bf16 ulp of the written one, except for ±0 with a
remainder >= 0x8000, where the borrow wraps the high half to a NaN pattern. The join therefore falls back to the
parameter itself wherever its result is not finite: ±0 stays ±0, and a non-finite parameter is taken as it is
(inf with a remainder >= 0x8000 is the finite master just below the bf16 overflow that rounds to it, as split
produced it).

Changing a parameter's dtype after its state exists is handled by ``state_conversion.py``.
"""

from __future__ import annotations

import torch

from ..quantization.reference import mix32

__all__ = ["MASTER_MODES", "concrete_master_mode", "resolve_master_mode", "split_bf16_remainder",
           "join_bf16_remainder", "stochastic_round_bf16", "mix32", "random16"]

MASTER_MODES = ("auto", "fp32", "bf16-remainder", "bf16-stochastic", "none")


def concrete_master_mode(mode: str, dtype: torch.dtype) -> "str | None":
    """The concrete mode that ``mode`` gives a parameter of ``dtype`` (``auto``: float32 -> ``fp32``, bfloat16 ->
    ``bf16-remainder``), or None where ``mode`` does not accept that dtype."""
    if mode == "none":
        return "none" if dtype.is_floating_point else None
    if dtype == torch.float32:
        return {"auto": "fp32", "fp32": "fp32"}.get(mode)
    if dtype == torch.bfloat16:
        return {"auto": "bf16-remainder", "bf16-remainder": "bf16-remainder",
                "bf16-stochastic": "bf16-stochastic"}.get(mode)
    return None


def resolve_master_mode(mode: str, param: torch.Tensor, name: str = "parameter") -> str:
    """The concrete mode for ``param`` (see :func:`concrete_master_mode`); raises ValueError naming ``name`` where
    ``mode`` does not accept the parameter's dtype."""
    if mode not in MASTER_MODES:
        raise ValueError(f"master_weights={mode!r} is not one of {MASTER_MODES}")
    dt = param.dtype
    concrete = concrete_master_mode(mode, dt)
    if concrete is not None:
        return concrete
    if not dt.is_floating_point:
        raise ValueError(f"{name} has non-float dtype {dt}")
    if mode == "auto":
        raise ValueError(
            f"{name} has dtype {dt}: master_weights='auto' handles float32 and bfloat16 parameters; "
            "pass master_weights='none' to update it in its own dtype"
        )
    if mode == "fp32":
        raise ValueError(f"master_weights='fp32' needs float32 parameters, but {name} is {dt}")
    raise ValueError(f"master_weights={mode!r} needs bfloat16 parameters, but {name} is {dt}")


def _bits32(x: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> its bit pattern as int64 in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits32(b: torch.Tensor) -> torch.Tensor:
    b = torch.where(b >= 2**31, b - 2**32, b)
    return b.to(torch.int32).view(torch.float32)


def split_bf16_remainder(p32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 rounded to nearest (ties away), int16 low bits). A NaN becomes a bf16 NaN of the same sign
    with remainder 0 (rounding a NaN's payload up would carry into the sign bit: 0x7FFFFFFF -> -0.0)."""
    b = _bits32(p32)
    nan = torch.isnan(p32)
    lo = torch.where(nan, 0, b & 0xFFFF)
    hi = torch.where(nan, (b >> 16) | 0x40, ((b >> 16) + (lo >= 0x8000).to(torch.int64)) & 0xFFFF)
    to16 = lambda t: torch.where(t >= 2**15, t - 2**16, t).to(torch.int16)  # noqa: E731
    return to16(hi).view(torch.bfloat16), to16(lo)


def join_bf16_remainder(p16: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """Exact fp32 master (``p16``'s shape) from the bf16 parameter and its int16 remainder; where the joined bits
    are not finite (±0 written over a remainder >= 0x8000, or a non-finite parameter) the parameter itself."""
    par = p16.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    lo = remainder.to(torch.int64) & 0xFFFF
    hi = (par - (lo >= 0x8000).to(torch.int64)) & 0xFFFF
    joined = _from_bits32((hi << 16) | lo)
    return torch.where(joined.abs() < float("inf"), joined, p16.float())


def stochastic_round_bf16(p32: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """Round fp32 to bf16 stochastically: add 16 random bits below the kept mantissa and truncate.

    ``random16`` holds integers in [0, 2^16) (any int dtype) of ``p32``'s shape. Unbiased:
    ``E[result] = p32`` for finite values that do not overflow.
    """
    bits = _bits32(p32)
    b = (bits + (random16.to(torch.int64) & 0xFFFF)) >> 16
    b = torch.where(torch.isnan(p32), (bits >> 16) | 0x40, b) & 0xFFFF  # a NaN stays a NaN
    return torch.where(b >= 2**15, b - 2**16, b).to(torch.int16).view(torch.bfloat16)


def random16(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """16 pseudo-random bits (int64 in [0, 2^16)) for each element offset of one tensor under a 32-bit ``key``:
    ``mix32(offset ^ mix32(key)) & 0xFFFF`` — the bits the fused Triton step adds below a bf16 mantissa."""
    k = mix32(torch.tensor(key & 0xFFFFFFFF, dtype=torch.int64))
    return mix32(offsets.to(torch.int64) ^ k.to(offsets.device)) & 0xFFFF
