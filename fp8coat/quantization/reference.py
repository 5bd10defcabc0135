"""Torch reference of the FP8 quantization primitives (the semantics every Triton kernel reproduces bit for bit).

Scaling rule, for a set of values X (one 1×G group along the last dim, or a whole tensor):

    a      = |x|, with NaN replaced by +inf          (a non-finite value poisons its whole set, loudly)
    amax   = max(a)                                  (fp32; 0 for an empty or all-zero set)
    scale  = max(amax / fmax, 2^-126)                 (fp32, IEEE division; the floor keeps 1/scale finite)
    q      = fp8( clamp(x * (1 / scale), -fmax, fmax) )   (round to nearest-even)
    x_hat  = fp32(q) * scale

Consequences: the largest |x| maps to ±fmax; exact zeros stay zero; an all-zero set gives q = 0; a set holding
inf or NaN gets scale = inf, so every element dequantizes to NaN rather than to a silently wrong finite value.
The arithmetic is one IEEE division per set and one multiply per element, so the Triton kernels can match it
exactly.

Per-group layout: ``x`` of shape ``(*lead, K)`` is split along the last dim into ``ceil(K / G)`` groups of ``G``
elements (the last one partial when ``G`` does not divide ``K``); scales have shape ``(*lead, ceil(K / G))``.
"""

from __future__ import annotations

import torch

from .._grid import padded
from .._numerics import ieee_div
from ..formats import FP8Format, get_format

__all__ = [
    "MIN_SCALE",
    "abs_for_amax",
    "check_destinations",
    "check_group_size",
    "check_scale",
    "dequantize_per_group",
    "dequantize_per_tensor",
    "fingerprint_units",
    "floor_min_scale",
    "group_amax",
    "grouped",
    "joint_tensor_scale",
    "mix32",
    "quantize_if",
    "quantize_per_group",
    "quantize_per_tensor",
    "quantize_transpose",
    "quantize_with_scale",
    "refresh_tensor_scale",
    "scale_from_amax",
    "tensor_amax",
    "tensor_fingerprint",
    "ungrouped",
]

MIN_SCALE = 2.0**-126  # smallest normal fp32


def check_group_size(group_size: int) -> None:
    """Group sizes are powers of two >= 16 (kernel tiles are powers of two)."""
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")


def abs_for_amax(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in fp32 with NaN mapped to +inf (so that max() sees it on every backend)."""
    a = x.float().abs()
    return torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)


def floor_min_scale(s: torch.Tensor) -> torch.Tensor:
    """``max(s, 2^-126)`` (NaN stays NaN): keeps ``1/s`` finite."""
    return torch.where(s < MIN_SCALE, torch.full_like(s, MIN_SCALE), s)


def scale_from_amax(amax: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Dequantization scale ``max(amax / fmax, 2^-126)`` (fp32, same shape as ``amax``)."""
    return floor_min_scale(ieee_div(amax.float(), fmt.max))


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(*lead, K)`` -> ``(*lead, ceil(K / G), G)``, the last group zero-padded."""
    pad = (-x.shape[-1]) % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def ungrouped(y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: ``(*lead, NG, G)`` -> ``(*lead, k)`` (a view; the padding dropped)."""
    return y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])[..., :k]


def group_amax(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group amax (fp32) of shape ``(*x.shape[:-1], ceil(K / G))``; NaN/inf in a group give +inf."""
    check_group_size(group_size)
    a = grouped(abs_for_amax(x), group_size)
    if a.numel() == 0:
        return a.new_zeros(a.shape[:-1])
    return a.amax(dim=-1)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """amax over the whole tensor as a 0-d fp32 tensor (0 for an empty tensor)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return abs_for_amax(x).amax()


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """``fp8(clamp(x * (1/scale)))`` with ``scale`` broadcastable to ``x`` (fp32)."""
    inv = ieee_div(1.0, scale.float())
    y = x.float() * inv
    return y.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quantize_per_group(x: torch.Tensor, fmt, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (``(*lead, K)``, any float dtype) in 1×G groups along the last dim.

    Returns ``(q, scale)``: ``q`` has ``x``'s shape in ``fmt``'s dtype (contiguous); ``scale`` is fp32 of shape
    ``(*lead, ceil(K / G))``.
    """
    fmt = get_format(fmt)
    if x.dim() == 0:
        raise ValueError("per-group quantization needs at least one dimension")
    k = x.shape[-1]
    scale = scale_from_amax(group_amax(x, group_size), fmt)
    q = ungrouped(quantize_with_scale(grouped(x.float(), group_size), scale.unsqueeze(-1), fmt), k)
    return q.contiguous(), scale


def dequantize_per_group(
    q: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_per_group`: ``fp32(q) * scale`` per group, cast to ``out_dtype``."""
    check_group_size(group_size)
    k = q.shape[-1]
    x = ungrouped(grouped(q.float(), group_size) * scale.float().unsqueeze(-1), k)
    return x.to(out_dtype).contiguous()


def quantize_per_tensor(
    x: torch.Tensor, fmt, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one scale. ``scale`` (0-d fp32) is computed from ``tensor_amax(x)`` when not given.

    Returns ``(q, scale)``; ``q`` has ``x``'s shape (contiguous), ``scale`` is a 0-d fp32 tensor.
    """
    fmt = get_format(fmt)
    if scale is None:
        scale = scale_from_amax(tensor_amax(x), fmt)
    scale = scale.float().reshape(())
    return quantize_with_scale(x, scale, fmt).contiguous(), scale


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(out_dtype)


def check_destinations(
    x: torch.Tensor, fmt: FP8Format, rowwise: bool, pad_to: int, transposed: bool,
    out: torch.Tensor | None, out_t: torch.Tensor | None,
) -> None:
    """Raise unless ``out`` / ``out_t`` (when given) fit :func:`quantize_transpose`'s outputs for ``x``: requested,
    shape, dtype, device, unit stride along rows (e.g. column blocks of a wider buffer)."""
    if out is None and out_t is None:
        return
    m, k = x.shape
    for name, t, used, shape in (("out", out, rowwise, (m, k)), ("out_t", out_t, transposed, (k, padded(m, pad_to)))):
        if t is None:
            continue
        if not used:
            raise ValueError(f"{name} given for a copy that is not requested")
        dense_rows = shape[1] <= 1 or t.stride(1) == 1
        if tuple(t.shape) != shape or t.dtype != fmt.dtype or t.device != x.device or not dense_rows:
            raise ValueError(f"{name} must be {shape} {fmt.dtype} on {x.device} with unit stride along rows, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device} with strides {t.stride()}")


def quantize_transpose(
    x: torch.Tensor, fmt, scale: torch.Tensor, rowwise: bool = True, pad_to: int = 16, transposed: bool = True,
    out: torch.Tensor | None = None, out_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-tensor quantization of a 2-D ``x`` (M, K) into a row-major copy and a transposed copy.

    Returns ``(q, qt)``: ``q`` (M, K) (None when ``rowwise`` is False) and ``qt`` (K, M_pad) with
    ``M_pad = ceil(M / pad_to) * pad_to``, zero beyond column M — the K-major operand Hopper's FP8 GEMMs need for
    weight gradients, padded so that its inner dimension is a multiple of 16 (None when ``transposed`` is False).
    ``out`` / ``out_t``: optional destinations (e.g. column blocks of one buffer shared by several tensors).
    """
    fmt = get_format(fmt)
    check_destinations(x, fmt, rowwise, pad_to, transposed, out, out_t)
    m, k = x.shape
    q = quantize_with_scale(x, scale, fmt)
    q_rows = None
    if rowwise:
        q_rows = out.copy_(q) if out is not None else q.contiguous()
    if not transposed:
        return q_rows, None
    qt = out_t if out_t is not None else torch.empty((k, padded(m, pad_to)), dtype=fmt.dtype, device=x.device)
    qt[:, m:].zero_()
    qt[:, :m] = q.t()
    return q_rows, qt


def joint_tensor_scale(xs: list[torch.Tensor], fmt) -> torch.Tensor:
    """The per-tensor scale of all of ``xs`` together, as if they were one tensor (0-d fp32)."""
    amax = torch.stack([tensor_amax(x).to(xs[0].device) for x in xs]).amax()
    return scale_from_amax(amax, get_format(fmt))


def check_scale(scale: torch.Tensor, *, check_value: bool = True) -> None:
    """Raise ``ValueError`` unless ``scale`` is a one-element floating-point tensor and, when it is on the CPU and
    ``check_value``, one whose fp32 value (the value the kernels use) lies in [2^-126, inf): the scales the
    library computes never go below 2^-126, where 1/scale would overflow. The value of a scale on an
    accelerator is not read (that would wait for the device)."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.numel() != 1:
        got = f"{scale.dtype} tensor of shape {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else repr(scale)
        raise ValueError(f"scale must be a one-element floating-point tensor, got {got}")
    if check_value and scale.device.type == "cpu":
        value = float(scale.float())
        if not (MIN_SCALE <= value < float("inf")):
            raise ValueError(f"scale must be a positive finite number >= 2^-126 in float32, got {float(scale)!r} "
                             f"({value!r} in float32)")


# ---------------------------------------------------------------------------------------------------------------
# content fingerprints: a cached quantization is reused only while the tensor's bytes are unchanged

_M32 = 0xFFFFFFFF
FINGERPRINT_STEP = 0x9E3779B9  # multiplies a unit's position before it is mixed with the unit


def fingerprint_units(x: torch.Tensor) -> torch.Tensor:
    """The words a fingerprint reads: ``x``'s bytes in row-major order as int32 words (4-byte dtypes; 2-byte dtypes
    with an even number of elements and a 4-byte aligned address: two elements per word, little-endian) or as
    int16 words (other 2-byte dtypes). A non-contiguous ``x`` is copied first. 1-D, contiguous."""
    if x.element_size() not in (2, 4):
        raise ValueError(f"fingerprints cover 2- and 4-byte dtypes, got {x.dtype}")
    c = x.detach().contiguous().reshape(-1)
    if x.element_size() == 4 or (c.numel() % 2 == 0 and c.data_ptr() % 4 == 0):
        return c.view(torch.int32)
    return c.view(torch.int16)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer, elementwise on integers in [0, 2^32) held as int64 (a bijection of 32-bit
    words with full avalanche). Triton twin: ``fp8coat._kernel_helpers.mix32`` (content fingerprints, stochastic
    rounding)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def tensor_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """64-bit content fingerprint of ``x`` as two 32-bit lanes: int64 tensor (2,) with values in [0, 2^32).

    For the words ``u_i`` of :func:`fingerprint_units` (zero-extended to 32 bits) at positions ``i``:
    ``h_i = mix32(u_i ^ (i · 0x9E3779B9 mod 2^32))``, lane 0 = ``Σ h_i``, lane 1 = ``Σ h_i · (2i + 1)`` (mod 2^32).
    Any change of one word changes lane 0 (``mix32`` is a bijection); changes of several words go unseen with
    probability about 2^-64. Every lane is a sum, so the Triton kernel may add its partial sums in any order.
    """
    units = fingerprint_units(x)
    mask = 0xFFFF if units.dtype == torch.int16 else _M32
    u = units.to(torch.int64) & mask
    i = torch.arange(u.numel(), dtype=torch.int64, device=u.device)
    h = mix32(u ^ ((i * FINGERPRINT_STEP) & _M32))
    lane0 = h.sum() & _M32
    lane1 = (h * ((2 * i + 1) & _M32) & _M32).sum() & _M32
    return torch.stack([lane0, lane1])


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def refresh_tensor_scale(x: torch.Tensor, fmt, record: torch.Tensor, cached_scale: torch.Tensor,
                         force: bool = False) -> torch.Tensor:
    """Check ``x`` against the fingerprint in ``record`` and refresh the cached per-tensor scale if it changed.

    ``record``: int32 (4,) on ``x``'s device = [fingerprint lane 0, lane 1, valid, changed]; ``cached_scale``: 0-d
    fp32. ``x`` counts as changed when ``force`` is set, ``valid`` is 0 or its fingerprint differs; then
    ``cached_scale`` becomes
    ``scale_from_amax(tensor_amax(x))``. Afterwards ``record`` holds ``x``'s fingerprint, valid = 1 and changed = 0
    or 1. Returns a new 0-d fp32 tensor equal to the (refreshed) cached scale. No host sync.
    """
    fmt = get_format(fmt)
    lanes = tensor_fingerprint(x)
    stored = record[:2].to(torch.int64) & _M32
    changed = (record[2] == 0) | (lanes != stored).any() | force
    fresh = scale_from_amax(tensor_amax(x), fmt)
    cached_scale.copy_(torch.where(changed, fresh, cached_scale))
    record[:2] = _as_int32(lanes)
    record[2] = 1
    record[3] = changed.to(torch.int32)
    return cached_scale.clone()


def quantize_if(x: torch.Tensor, fmt, scale: torch.Tensor, out: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """``out <- quantize_with_scale(x, scale)`` where the one-element int ``flag`` is non-zero; ``out`` keeps its
    contents otherwise (no host sync). Returns ``out``."""
    fmt = get_format(fmt)
    q = quantize_with_scale(x, scale, fmt).view(torch.uint8)  # torch.where has no fp8 kernels: select the bytes
    bytes_out = out.view(torch.uint8)
    bytes_out.copy_(torch.where(flag.reshape(()) != 0, q, bytes_out))
    return out
