"""FP8 quantization primitives with one dispatch point.

``backend=None`` (the default) picks the Triton kernels for CUDA tensors and the torch reference otherwise;
``"torch"`` / ``"triton"`` force one (tests run the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``).
Both backends compute bit-identical data and scales (see ``reference.py`` for the exact rule).
"""

from __future__ import annotations

import functools
import os

import torch

from ..formats import get_format
from . import reference
from .reference import MIN_SCALE, check_group_size, check_scale, scale_from_amax

__all__ = [
    "MIN_SCALE",
    "check_group_size",
    "check_scale",
    "check_triton_device",
    "dequantize_per_group",
    "dequantize_per_tensor",
    "joint_tensor_scale",
    "quantize_if",
    "quantize_per_group",
    "quantize_per_tensor",
    "quantize_transpose",
    "refresh_tensor_scale",
    "resolve_backend",
    "scale_from_amax",
    "tensor_amax",
    "tensor_fingerprint",
    "tensor_scale",
]

BACKENDS = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend that runs for tensor ``x``: the requested one, or Triton on CUDA and torch elsewhere."""
    if backend is None:
        return "triton" if (x.is_cuda and triton_available()) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        check_triton_device(x)
    return backend


def check_triton_device(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless Triton kernels can run on ``x``: a CUDA tensor, or any tensor under the Triton
    interpreter (``TRITON_INTERPRET=1`` set before triton is imported; used by the tests on the CPU)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got a tensor on {x.device}; use backend=None "
                         "(Triton on CUDA, torch elsewhere) or 'torch'")


@functools.cache
def _kernels():
    from . import triton_kernels

    return triton_kernels


def quantize_per_group(x: torch.Tensor, fmt="e4m3", group_size: int = 16, *, backend: str | None = None):
    """Quantize ``x`` ``(*lead, K)`` in 1×G groups along the last dim -> ``(q, scale)``.

    ``q``: ``x.shape``, fp8 dtype of ``fmt``; ``scale``: fp32 ``(*lead, ceil(K/G))``; ``x ≈ q * scale``.
    """
    if resolve_backend(x, backend) == "triton":
        return _kernels().quantize_per_group_triton(x, fmt, group_size)
    return reference.quantize_per_group(x, fmt, group_size)


def dequantize_per_group(q, scale, group_size: int = 16, out_dtype=torch.float32, *, backend: str | None = None):
    """``fp32(q) * scale`` per 1×G group, returned in ``out_dtype`` with ``q``'s shape."""
    if resolve_backend(q, backend) == "triton":
        return _kernels().dequantize_per_group_triton(q, scale, group_size, out_dtype)
    return reference.dequantize_per_group(q, scale, group_size, out_dtype)


def tensor_amax(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """0-d fp32 amax of ``x`` (NaN counts as +inf), computed on ``x``'s device without a host sync."""
    if resolve_backend(x, backend) == "triton":
        return _kernels().tensor_amax_triton(x)
    return reference.tensor_amax(x)


def tensor_scale(x: torch.Tensor, fmt="e4m3", *, backend: str | None = None) -> torch.Tensor:
    """Per-tensor dequantization scale ``max(amax(x) / fmax, 2^-126)`` (0-d fp32, on x's device, no host sync)."""
    if resolve_backend(x, backend) == "triton":
        return _kernels().tensor_scale_triton(x, fmt)
    return scale_from_amax(reference.tensor_amax(x), get_format(fmt))


def quantize_per_tensor(x: torch.Tensor, fmt="e4m3", scale=None, *, backend: str | None = None):
    """Quantize ``x`` with one fp32 scale -> ``(q, scale)``; the scale comes from the two-stage amax if not given.
    A given ``scale`` must be a one-element float tensor, positive and finite (checked when it is on the CPU)."""
    if scale is not None:
        check_scale(scale)
    if resolve_backend(x, backend) == "triton":
        return _kernels().quantize_per_tensor_triton(x, fmt, scale)
    return reference.quantize_per_tensor(x, get_format(fmt), scale)


def quantize_transpose(x: torch.Tensor, fmt, scale: torch.Tensor, rowwise: bool = True, pad_to: int = 16,
                       transposed: bool = True, *, out: torch.Tensor | None = None,
                       out_t: torch.Tensor | None = None, backend: str | None = None):
    """2-D ``x`` (M, K) with one scale -> ``(q (M, K) or None, qt (K, M_pad) or None)``, optionally written into
    ``out`` / ``out_t``; see ``reference.quantize_transpose``. ``scale``: a one-element float tensor (+inf, the
    scale of a tensor holding inf or NaN, gives codes that dequantize to NaN)."""
    check_scale(scale, check_value=False)
    if resolve_backend(x, backend) == "triton":
        return _kernels().quantize_transpose_triton(x, fmt, scale, rowwise, pad_to, transposed, out, out_t)
    return reference.quantize_transpose(x, fmt, scale, rowwise, pad_to, transposed, out, out_t)


def joint_tensor_scale(xs: list[torch.Tensor], fmt="e4m3", *, backend: str | None = None) -> torch.Tensor:
    """The per-tensor scale of several tensors together (as if concatenated): 0-d fp32, no host sync. Used where
    one FP8 GEMM consumes them as one operand (e.g. the gradients of q/k/v in one input-gradient GEMM)."""
    if not xs:
        raise ValueError("joint_tensor_scale needs at least one tensor")
    if resolve_backend(xs[0], backend) == "triton":
        return _kernels().joint_tensor_scale_triton(list(xs), fmt)
    return reference.joint_tensor_scale(list(xs), fmt)


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    return reference.dequantize_per_tensor(q, scale, out_dtype)


def tensor_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """64-bit content fingerprint of ``x`` (int64 (2,), two 32-bit lanes); see ``reference.tensor_fingerprint``."""
    return reference.tensor_fingerprint(x)


def refresh_tensor_scale(x: torch.Tensor, fmt, record: torch.Tensor, cached_scale: torch.Tensor,
                         force: bool = False, *, backend: str | None = None) -> torch.Tensor:
    """Compare ``x``'s content fingerprint with the one in ``record`` (int32 (4,): lane 0, lane 1, valid, changed)
    and refresh ``cached_scale`` (0-d fp32) if ``x`` changed (or ``force``); returns the scale as a new 0-d fp32
    tensor and sets ``record[3]`` to 1 (changed) or 0. One pass over ``x``, no host sync; see
    ``reference.refresh_tensor_scale``."""
    if resolve_backend(x, backend) == "triton":
        return _kernels().refresh_tensor_scale_triton(x, fmt, record, cached_scale, force)
    return reference.refresh_tensor_scale(x, fmt, record, cached_scale, force)


def quantize_if(x: torch.Tensor, fmt, scale: torch.Tensor, out: torch.Tensor, flag: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """Quantize ``x`` with ``scale`` into ``out`` (contiguous, ``x``'s shape) only where the int ``flag`` on the
    device is non-zero; returns ``out``."""
    if resolve_backend(x, backend) == "triton":
        return _kernels().quantize_if_triton(x, fmt, scale, out, flag)
    return reference.quantize_if(x, fmt, scale, out, flag)
