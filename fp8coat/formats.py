"""FP8 number formats and the one safe way to cast into them.

Two formats exist on Hopper-class hardware (OCP FP8):

==========  ====  ================  ==================  ==============
format      max   min normal        min subnormal       mantissa bits
==========  ====  ================  ==================  ==============
E4M3 (fn)   448   2^-6 = 0.015625   2^-9 = 0.001953     3
E5M2        57344 2^-14             2^-16               2
==========  ====  ================  ==================  ==============

E4M3 ("fn": finite, no infinities, one NaN pattern) is the forward / optimizer-state format; E5M2 keeps
infinities and is the usual gradient format.

Casting trap: depending on the torch version a float -> E4M3 cast of an out-of-range value saturates (2.13) or
gives NaN (2.11), and float -> E5M2 gives inf. Every cast in fp8coat therefore goes through :func:`cast_to_fp8`,
which clamps to ``±max`` first (NaN stays NaN) and then rounds to nearest-even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FP8Format", "E4M3", "E5M2", "FORMATS", "get_format", "cast_to_fp8"]


@dataclass(frozen=True)
class FP8Format:
    """Description of one FP8 format.

    Attributes:
        name: ``"e4m3"`` or ``"e5m2"``.
        dtype: the torch dtype that stores it (1 byte per element).
        max: largest finite magnitude.
        min_normal: smallest positive normal magnitude.
        min_subnormal: smallest positive magnitude.
        mantissa_bits: explicit mantissa bits (precision is ``2^-mantissa_bits`` relative, near 1).
    """

    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    mantissa_bits: int

    @property
    def dynamic_range(self) -> float:
        """Ratio of the largest to the smallest positive magnitude (E4M3: 229376)."""
        return self.max / self.min_subnormal

    def __repr__(self) -> str:  # short, used in error messages and extra_repr
        return self.name.upper()


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 3)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 2)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def get_format(fmt: "str | FP8Format | torch.dtype") -> FP8Format:
    """Return the :class:`FP8Format` for a name (``"e4m3"``/``"E5M2"``), a torch fp8 dtype, or a format."""
    if isinstance(fmt, FP8Format):
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in FORMATS.values():
            if f.dtype == fmt:
                return f
        raise ValueError(f"{fmt} is not an FP8 dtype; expected torch.float8_e4m3fn or torch.float8_e5m2")
    if isinstance(fmt, str) and fmt.lower() in FORMATS:
        return FORMATS[fmt.lower()]
    raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {sorted(FORMATS)}")


def cast_to_fp8(x: torch.Tensor, fmt: "str | FP8Format") -> torch.Tensor:
    """Clamp ``x`` to ``±fmt.max`` and round to nearest-even into ``fmt.dtype``.

    ``x`` is any float tensor (fp32/bf16/fp16); NaN stays NaN; ±inf becomes ±max. Same shape, 1 byte/element.
    """
    f = get_format(fmt)
    return x.clamp(-f.max, f.max).to(f.dtype)
