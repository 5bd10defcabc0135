"""Launch-grid arithmetic in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from host code each call goes through
Triton's argument unwrapping (a few µs), and the launchers call them several times per kernel. These are the same
functions on Python ints.
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1; 0 for n = 0 (as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
