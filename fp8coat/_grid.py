"""Launch-grid arithmetic in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from host code each call goes through
Triton's argument unwrapping (a few µs), and the launchers call them several times per kernel. These are the same
functions on Python ints, plus the tile rule the row-wise kernels share (:func:`tile_2d`).
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2", "padded", "tile_2d"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def padded(n: int, multiple: int = 16) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (> 0)."""
    return cdiv(n, multiple) * multiple


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1; 0 for n = 0 (as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def tile_2d(r: int, k: int, *, min_k: int, max_k: int | None, elems: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K), powers of two, for a kernel that tiles an (r, k) view: BLOCK_K = next_pow2(k) clamped to
    [min_k, max_k] (no upper clamp for ``max_k=None``: whole rows), BLOCK_R = up to next_pow2(r) rows, at most
    ``elems // BLOCK_K`` of them and at least 1."""
    block_k = next_power_of_2(max(k, 1))
    if max_k is not None:
        block_k = min(max_k, block_k)
    block_k = max(min_k, block_k)
    block_r = max(1, min(next_power_of_2(max(r, 1)), elems // block_k))
    return block_r, block_k
