"""Triton kernels for the FP8 quantization primitives; semantics identical to ``reference.py`` bit for bit.

Every kernel works on a 2-D view ``(R, K)`` of its input with arbitrary strides (any shape, non-contiguous input,
0 elements are handled by the launchers). Divisions use ``tl.div_rn`` (IEEE round-to-nearest) so that scales match
torch exactly; the per-element work is one multiply, a clamp and the cast. The arithmetic shared with the other
kernel files (scale from amax, clamp-then-cast, per-group quantize / dequantize, mix32) is in
``fp8coat._kernel_helpers``.

Kernels:
  * ``_group_quant_kernel``   x -> (q, scale) per 1×G group (scale fp32, shape (R, ceil(K/G))).
  * ``_group_dequant_kernel`` (q, scale) -> x.
  * ``_amax_kernel``          per-tensor amax or scale in one launch (partials + last-program reduction), no host sync.
  * ``_scaled_quant_kernel``  stage 2: quantize with one scale read from device memory (optionally only where a
                              flag in device memory is set).
  * ``_fingerprint_kernel``   content fingerprint + amax in one pass: refreshes a cached per-tensor scale only
                              when the tensor's bytes changed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, padded, tile_2d
from .._kernel_helpers import abs_nan_to_inf, clamp_cast, group_dequant, group_quant_store, mix32, scale_from_amax_tl
from .._launch import fast_kernel
from ..formats import FP8Format, get_format
from .reference import FINGERPRINT_STEP as _FINGERPRINT_STEP_PY
from .reference import MIN_SCALE, check_destinations, check_group_size, fingerprint_units

__all__ = [
    "dequantize_per_group_triton",
    "joint_tensor_scale_triton",
    "quantize_if_triton",
    "quantize_per_group_triton",
    "quantize_per_tensor_triton",
    "quantize_transpose_triton",
    "refresh_tensor_scale_triton",
    "tensor_amax_triton",
    "tensor_scale_triton",
]


FINGERPRINT_STEP = tl.constexpr(_FINGERPRINT_STEP_PY)  # globals used inside kernels must be constexpr


@fast_kernel
@triton.jit
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr,  # x: (R, K) strided; q: (R, K) contiguous; s: (R, NG) contiguous fp32
    R, K, NG, stride_xr, stride_xk,
    FMAX: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    group_quant_store(x, q_ptr, s_ptr, rows, cols, mask, pid_k, R, K, NG, FMAX, G, BLOCK_R, BLOCK_K)


@fast_kernel
@triton.jit
def _group_dequant_kernel(
    q_ptr, s_ptr, x_ptr,  # q: (R, K) strided; s: (R, NG) contiguous; x: (R, K) contiguous
    R, K, NG, stride_qr, stride_qk,
    G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_qr + cols[None, :] * stride_qk, mask=mask, other=0.0).to(tl.float32)
    x = group_dequant(q, s_ptr, rows, pid_k, R, NG, G, BLOCK_R, BLOCK_K)
    tl.store(x_ptr + rows[:, None] * K + cols[None, :], x.to(x_ptr.dtype.element_ty), mask=mask)


@fast_kernel
@triton.jit
def _amax_kernel(
    x_ptr, part_ptr, count_ptr, out_ptr,  # part: (>= programs,) fp32 scratch; count: int32, 0 on entry and exit
    R, K, stride_xr, stride_xk, TILES_K, TILES,  # x: (R, K) strided, cut in TILES tiles, TILES_K per tile row
    FMAX: tl.constexpr, SCALE: tl.constexpr, PRIOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-tensor amax (NaN counts as +inf) in one launch -> out_ptr: the amax, or with SCALE the scale
    ``scale_from_amax(amax, FMAX)``. With PRIOR, out_ptr holds the amax of earlier tensors on entry (written by
    an earlier launch on the same stream) and the result covers them too: a chain of launches gives the amax or
    scale of several tensors together.

    Each program folds tiles pid, pid + programs, ... into a running maximum (a few programs per SM, so few
    partials and atomics) and stores its partial; the program that finishes last (an acquire-release atomic
    counter makes every other partial visible to it) reduces the partials, writes the result and resets the
    counter to zero, so the counter can be reused by the next launch on the same stream without a memset.
    """
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for t in range(pid, TILES, n):
        tr = t // TILES_K
        tk = t - tr * TILES_K
        rows = tr * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tk * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0)
        acc = tl.maximum(acc, abs_nan_to_inf(x.to(tl.float32)))
    tl.store(part_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if done == n - 1:
        offs = tl.arange(0, BLOCK)
        amax = tl.max(tl.load(part_ptr + offs, mask=offs < n, other=0.0, volatile=True), axis=0)
        if PRIOR:
            amax = tl.maximum(amax, tl.load(out_ptr))  # both are >= 0 or +inf: no NaN to lose
        if SCALE:
            tl.store(out_ptr, scale_from_amax_tl(amax, FMAX))
        else:
            tl.store(out_ptr, amax)
        tl.atomic_xchg(count_ptr, 0)


@fast_kernel
@triton.jit
def _scaled_quant_kernel(
    x_ptr, s_ptr, q_ptr, flag_ptr,  # x: (R, K) strided; s: 0-d fp32 scale; q: (R, K) contiguous; flag: int32
    R, K, stride_xr, stride_xk,
    FMAX: tl.constexpr, CONDITIONAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """q = quantize(x, scale); with CONDITIONAL only where ``*flag_ptr != 0`` (else nothing is read or written)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    if CONDITIONAL:
        mask = mask & (tl.load(flag_ptr) != 0)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr)
    inv = tl.div_rn(1.0, s)
    q = clamp_cast(x * inv, FMAX, q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)


@fast_kernel
@triton.jit
def _fingerprint_kernel(
    u_ptr, amax_part, hash_part, count_ptr, record_ptr, cached_ptr, out_ptr,
    N, TILES, FORCE,  # u: (N,) words (int32, or int16 zero-extended) cut in TILES tiles of BLOCK; FORCE: 0 or 1
    FMAX: tl.constexpr, DT: tl.constexpr, PAIRS: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):
    """``reference.refresh_tensor_scale`` in one launch. ``DT``: the tensor's float dtype; ``PAIRS``: int32 words
    holding two 16-bit elements. amax_part: fp32 (>= programs,), hash_part: int32 (2·RBLOCK,) scratch; count:
    int32, 0 on entry and exit (see ``_amax_kernel``); record: int32 (4,) [lane 0, lane 1, valid, changed];
    cached: 0-d fp32 (the cached scale, refreshed when changed); out: 0-d fp32 (receives the resulting scale)."""
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    lane0 = tl.zeros((BLOCK,), dtype=tl.uint32)
    lane1 = tl.zeros((BLOCK,), dtype=tl.uint32)
    for t in range(pid, TILES, n):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        w = tl.load(u_ptr + offs, mask=mask, other=0)
        if PAIRS:
            u = w.to(tl.uint32, bitcast=True)
            lo = (u & 0xFFFF).to(tl.uint16).to(DT, bitcast=True).to(tl.float32)
            hi = (u >> 16).to(tl.uint16).to(DT, bitcast=True).to(tl.float32)
            a = tl.maximum(abs_nan_to_inf(lo), abs_nan_to_inf(hi))
        elif DT == tl.float32:
            u = w.to(tl.uint32, bitcast=True)
            a = abs_nan_to_inf(w.to(tl.float32, bitcast=True))
        else:
            u = w.to(tl.uint16, bitcast=True).to(tl.uint32)
            a = abs_nan_to_inf(w.to(DT, bitcast=True).to(tl.float32))
        acc = tl.maximum(acc, a)  # masked lanes hold 0
        pos = offs.to(tl.uint32)
        h = tl.where(mask, mix32(u ^ (pos * FINGERPRINT_STEP)), 0)
        lane0 += h
        lane1 += h * (2 * pos + 1)
    tl.store(amax_part + pid, tl.max(acc, axis=0))
    tl.store(hash_part + pid, tl.sum(lane0, axis=0).to(tl.int32, bitcast=True))
    tl.store(hash_part + RBLOCK + pid, tl.sum(lane1, axis=0).to(tl.int32, bitcast=True))
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if done == n - 1:
        r = tl.arange(0, RBLOCK)
        rmask = r < n
        amax = tl.max(tl.load(amax_part + r, mask=rmask, other=0.0, volatile=True), axis=0)
        h0 = tl.sum(tl.load(hash_part + r, mask=rmask, other=0, volatile=True).to(tl.uint32, bitcast=True), axis=0)
        h1 = tl.sum(tl.load(hash_part + RBLOCK + r, mask=rmask, other=0, volatile=True).to(tl.uint32, bitcast=True),
                    axis=0)
        old0 = tl.load(record_ptr).to(tl.uint32, bitcast=True)
        old1 = tl.load(record_ptr + 1).to(tl.uint32, bitcast=True)
        changed = (FORCE != 0) | (tl.load(record_ptr + 2) == 0) | (h0 != old0) | (h1 != old1)
        scale = tl.where(changed, scale_from_amax_tl(amax, FMAX), tl.load(cached_ptr))
        tl.store(cached_ptr, scale)
        tl.store(out_ptr, scale)
        tl.store(record_ptr, h0.to(tl.int32, bitcast=True))
        tl.store(record_ptr + 1, h1.to(tl.int32, bitcast=True))
        tl.store(record_ptr + 2, 1)
        tl.store(record_ptr + 3, changed.to(tl.int32))
        tl.atomic_xchg(count_ptr, 0)


@fast_kernel
@triton.jit
def _quant_transpose_kernel(
    x_ptr, s_ptr, q_ptr, qt_ptr,  # x: (M, K) strided; s: 0-d fp32; q: (M, K), qt: (K, M_pad), rows dense
    M, K, M_pad, stride_xm, stride_xk, stride_qm, stride_qtk,
    FMAX: tl.constexpr, ROWWISE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    inv = tl.div_rn(1.0, tl.load(s_ptr))
    y = x * inv
    if ROWWISE:
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], clamp_cast(y, FMAX, qt_ptr.dtype.element_ty),
                 mask=mask)
    if TRANSPOSED:
        # transpose the fp32 tile, then cast: (the same values; a transposed fp8 tile from fp32 input came out
        # wrong on sm_90 with triton 3.6). Padded rows (M <= row < M_pad) are zeros: x was loaded as 0 there.
        tmask = (cols[:, None] < K) & (rows[None, :] < M_pad)
        qt = clamp_cast(tl.trans(y), FMAX, qt_ptr.dtype.element_ty)
        tl.store(qt_ptr + cols[:, None] * stride_qtk + rows[None, :], qt, mask=tmask)


# ---------------------------------------------------------------------------------------------------------------
# launchers


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """(*lead, K) -> (R, K); a view when the leading dims collapse, else a copy. 0-d -> (1, 1)."""
    dim = x.dim()
    if dim == 2:
        return x  # the common case, without an aten call (host time counts: every FP8 linear passes here)
    if dim == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


def _scalar_f32(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as the 0-d fp32 tensor the kernels read; itself when it already is one (no aten call)."""
    if scale.dtype == torch.float32 and scale.dim() == 0:
        return scale
    return scale.float().reshape(())


def _tiles(r: int, k: int, min_k: int = 16) -> tuple[int, int]:
    """Tile (BLOCK_R, BLOCK_K) of about 4096 elements, powers of two, min_k <= BLOCK_K <= 1024."""
    return tile_2d(r, k, min_k=min_k, max_k=1024, elems=4096)


def quantize_per_group_triton(x: torch.Tensor, fmt, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = get_format(fmt)
    check_group_size(group_size)
    if x.dim() == 0:
        raise ValueError("per-group quantization needs at least one dimension")
    k = x.shape[-1]
    ng = cdiv(k, group_size)
    q = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
    s = torch.empty((*x.shape[:-1], ng), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, s
    x2 = _as_2d(x)
    r = x2.shape[0]
    block_r, block_k = _tiles(r, k, min_k=group_size)
    grid = (cdiv(r, block_r), cdiv(k, block_k))
    _group_quant_kernel[grid](
        x2, q, s, r, k, ng, x2.stride(0), x2.stride(1),
        FMAX=fmt.max, G=group_size, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return q, s


def dequantize_per_group_triton(
    q: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    check_group_size(group_size)
    k = q.shape[-1]
    ng = cdiv(k, group_size)
    if scale.shape != (*q.shape[:-1], ng):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)} with G={group_size}")
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if q.numel() == 0:
        return out
    q2 = _as_2d(q)
    s2 = scale.float().contiguous()
    r = q2.shape[0]
    block_r, block_k = _tiles(r, k, min_k=group_size)
    grid = (cdiv(r, block_r), cdiv(k, block_k))
    _group_dequant_kernel[grid](q2, s2, out, r, k, ng, q2.stride(0), q2.stride(1), G=group_size, BLOCK_R=block_r,
                                BLOCK_K=block_k)
    return out


def tensor_amax_triton(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor amax in one launch (``_amax_kernel``): 0-d fp32, no host sync."""
    out = torch.empty((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out.zero_()
    _launch_amax(x, out, None)
    return out


def quantize_transpose_triton(x: torch.Tensor, fmt, scale: torch.Tensor, rowwise: bool = True, pad_to: int = 16,
                              transposed: bool = True, out: torch.Tensor | None = None,
                              out_t: torch.Tensor | None = None):
    """Triton twin of ``reference.quantize_transpose``: x (M, K) -> (q (M, K) or None, qt (K, M_pad) or None),
    written into ``out`` / ``out_t`` when given."""
    fmt = get_format(fmt)
    check_destinations(x, fmt, rowwise, pad_to, transposed, out, out_t)
    m, k = x.shape
    m_pad = padded(m, pad_to) if transposed else m
    qt = None
    if transposed:
        qt = out_t if out_t is not None else torch.empty((k, m_pad), dtype=fmt.dtype, device=x.device)
    if transposed and x.element_size() == 4 and m_pad * k:
        # 4-byte inputs: the fused transposed store gave wrong values on sm_90 (triton 3.6) while the interpreter
        # and 2-byte inputs are right. Quantize the transposed view with the plain kernel instead.
        q = None
        if rowwise:
            q = quantize_per_tensor_triton(x, fmt, scale)[0]
            q = out.copy_(q) if out is not None else q
        qt[:, m:].zero_()
        qt[:, :m] = quantize_per_tensor_triton(x.t(), fmt, scale)[0]
        return q, qt
    q = None
    if rowwise:
        q = out if out is not None else torch.empty((m, k), dtype=fmt.dtype, device=x.device)
    if m_pad * k == 0 or not (rowwise or transposed):
        return q, qt
    # tiles from a sweep on an H200 (scripts/quant_transpose_sweep_gpu.py; 8192 × 4096 and 8192 × 11008 bf16):
    # both copies 64 × 128 with 4 warps (13% faster than 64 × 64), the transposed copy alone 64 × 64 with 8 warps
    block_m, block_k, warps = (64, 128, 4) if rowwise else (64, 64, 8)
    grid = (cdiv(m_pad if transposed else m, block_m), cdiv(k, block_k))
    first, second = (q if rowwise else qt), (qt if transposed else q)
    _quant_transpose_kernel[grid](
        x, _scalar_f32(scale), first, second, m, k, m_pad,
        x.stride(0), x.stride(1), q.stride(0) if rowwise else 0, qt.stride(0) if transposed else 0,
        FMAX=fmt.max, ROWWISE=rowwise, TRANSPOSED=transposed, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )
    return q, qt


def tensor_scale_triton(x: torch.Tensor, fmt) -> torch.Tensor:
    """Per-tensor scale ``max(amax(x) / fmax, 2^-126)`` as a 0-d fp32 device tensor: one launch, no host sync."""
    fmt = get_format(fmt)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return scale.fill_(MIN_SCALE)
    _launch_amax(x, scale, fmt)
    return scale


def joint_tensor_scale_triton(xs: list[torch.Tensor], fmt) -> torch.Tensor:
    """The per-tensor scale of all of ``xs`` together (as if concatenated): one chained launch per non-empty
    tensor, no host sync; 0-d fp32 on the first tensor's device."""
    fmt = get_format(fmt)
    scale = torch.empty((), dtype=torch.float32, device=xs[0].device)
    xs = [x for x in xs if x.numel()]
    if not xs:
        return scale.fill_(MIN_SCALE)
    for i, x in enumerate(xs):
        _launch_amax(x, scale, fmt if i == len(xs) - 1 else None, prior=i > 0)
    return scale


AMAX_PROGRAMS = 1024  # at most this many programs per amax launch (~8 per SM on a 132-SM GPU)
_AMAX_SCRATCH: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_AMAX_SCRATCH_STREAMS = 64  # scratch pairs kept at most


def _amax_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials (AMAX_PROGRAMS,) fp32, counter (1,) int32 holding 0) for one ``_amax_kernel`` launch.

    On CUDA one pair per (device, stream), allocated once: launches on one stream run one after another and
    each leaves the counter at zero, so no memset is needed per call. While a CUDA graph is being captured, a
    fresh pair (zeroed inside the graph) keeps the graph's launches apart from eager ones on the same stream.
    """
    return _per_stream(_AMAX_SCRATCH, device, lambda: (torch.empty(AMAX_PROGRAMS, dtype=torch.float32, device=device),
                                                       torch.zeros(1, dtype=torch.int32, device=device)))


_HASH_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}


def _hash_scratch(device: torch.device) -> torch.Tensor:
    """int32 (2 · AMAX_PROGRAMS,) partial fingerprints for one ``_fingerprint_kernel`` launch, kept like
    ``_amax_scratch``'s pair (every program overwrites its own slots: no reset is needed)."""
    return _per_stream(_HASH_SCRATCH, device, lambda: torch.empty(2 * AMAX_PROGRAMS, dtype=torch.int32, device=device))


def _per_stream(table: dict, device: torch.device, make):
    """``make()`` once per (CUDA device, stream), kept in ``table``; a fresh ``make()`` off CUDA and while a CUDA
    graph is being captured."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()
    index = torch.cuda.current_device()  # the kernels run on the current device's current stream
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    value = table.get(key)
    if value is None:
        if len(table) >= _AMAX_SCRATCH_STREAMS:  # streams come and go: start over rather than grow
            table.clear()  # safe: each value was allocated on, and used only on, its own stream
        value = table[key] = make()
    return value


def _launch_amax(x: torch.Tensor, out: torch.Tensor, fmt: FP8Format | None,
                 max_programs: int = AMAX_PROGRAMS, prior: bool = False) -> None:
    """amax (``fmt`` None) or scale of non-empty ``x`` into the 0-d fp32 ``out`` (with ``prior``, of ``x`` and the
    amax ``out`` holds); ``max_programs`` <= AMAX_PROGRAMS (tests lower it to make programs loop over tiles)."""
    x2 = _as_2d(x)
    r, k = x2.shape
    block_r, block_k = _tiles(r, k)
    tiles_k = cdiv(k, block_k)
    tiles = cdiv(r, block_r) * tiles_k
    part, count = _amax_scratch(x.device)
    _amax_kernel[(min(tiles, max_programs, AMAX_PROGRAMS),)](
        x2, part, count, out, r, k, x2.stride(0), x2.stride(1), tiles_k, tiles,
        FMAX=fmt.max if fmt is not None else 1.0, SCALE=fmt is not None, PRIOR=prior, BLOCK_R=block_r, BLOCK_K=block_k,
        BLOCK=AMAX_PROGRAMS,
    )


def quantize_per_tensor_triton(
    x: torch.Tensor, fmt, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt: FP8Format = get_format(fmt)
    if scale is None:
        scale = tensor_scale_triton(x, fmt)
    scale = _scalar_f32(scale)
    q = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
    if x.numel() == 0:
        return q, scale
    x2 = _as_2d(x)
    r, k = x2.shape
    block_r, block_k = _tiles(r, k)
    grid = (cdiv(r, block_r), cdiv(k, block_k))
    _scaled_quant_kernel[grid](x2, scale, q, scale, r, k, x2.stride(0), x2.stride(1), FMAX=fmt.max, CONDITIONAL=False,
                               BLOCK_R=block_r, BLOCK_K=block_k)
    return q, scale


def quantize_if_triton(x: torch.Tensor, fmt, scale: torch.Tensor, out: torch.Tensor,
                       flag: torch.Tensor) -> torch.Tensor:
    """Triton twin of ``reference.quantize_if``: ``out`` (x's shape, contiguous, fmt's dtype) is rewritten only
    where the int32 ``flag`` on the device is non-zero; the kernel's programs read nothing else otherwise."""
    fmt = get_format(fmt)
    if x.numel() == 0:
        return out
    x2 = _as_2d(x)
    r, k = x2.shape
    block_r, block_k = _tiles(r, k)
    grid = (cdiv(r, block_r), cdiv(k, block_k))
    _scaled_quant_kernel[grid](x2, _scalar_f32(scale), out, flag, r, k, x2.stride(0), x2.stride(1), FMAX=fmt.max,
                               CONDITIONAL=True, BLOCK_R=block_r, BLOCK_K=block_k)
    return out


FINGERPRINT_BLOCK = 2048  # words per tile (4096 elements of a 2-byte dtype)
_FLOAT_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def refresh_tensor_scale_triton(x: torch.Tensor, fmt, record: torch.Tensor, cached_scale: torch.Tensor,
                                force: bool = False) -> torch.Tensor:
    """Triton twin of ``reference.refresh_tensor_scale`` (one launch, no host sync); returns a new 0-d fp32 scale."""
    fmt = get_format(fmt)
    if x.dtype not in _FLOAT_TL:
        raise ValueError(f"content fingerprints cover float32, bfloat16 and float16 tensors, got {x.dtype}")
    units = fingerprint_units(x)
    n = units.numel()
    if n >= 2**31:
        raise ValueError(f"content fingerprints cover tensors of fewer than 2^31 words, got {n}")
    out = torch.empty((), dtype=torch.float32, device=x.device)
    tiles = max(cdiv(n, FINGERPRINT_BLOCK), 1)
    amax_part, count = _amax_scratch(x.device)
    hash_part = _hash_scratch(x.device)
    _fingerprint_kernel[(min(tiles, AMAX_PROGRAMS),)](
        units, amax_part, hash_part, count, record, cached_scale, out, n, tiles, int(force),
        FMAX=fmt.max, DT=_FLOAT_TL[x.dtype], PAIRS=units.dtype == torch.int32 and x.element_size() == 2,
        BLOCK=FINGERPRINT_BLOCK, RBLOCK=AMAX_PROGRAMS,
    )
    return out
