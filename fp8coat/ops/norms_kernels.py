"""Triton kernels of ``fp8coat.ops.norms`` (RMSNorm / LayerNorm with an FP8 copy of the input) and their
launchers; the arithmetic, step by step, is in the ``norms`` module docstring. Imported only when the Triton
backend runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, tile_2d
from .._kernel_helpers import fold_tile_amax, group_dequant_load, group_quant_store
from .._launch import fast_kernel
from .._numerics import f32
from ..formats import E4M3

__all__ = ["norm_bwd_triton", "norm_fwd_triton"]

_TILE_ELEMS = 4096  # elements per program and row block (BLOCK_R * BLOCK_H, BLOCK_R >= 1)


@fast_kernel
@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr,  # x: (R, H) strided; w, b: (H,)
    y_ptr, q_ptr, s_ptr, rstd_ptr,  # y, q: (R, H); s: (R, NG); rstd: (R,) — all contiguous
    amax_ptr,  # int32 (), zero on entry: the bits of amax(|y|) on exit
    R, H, NG, stride_xr, stride_xh, eps,  # eps: fp32
    LAYERNORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    FMAX: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < R
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xr + cols[None, :] * stride_xh, mask=mask, other=0.0)
    x = x.to(tl.float32)
    xd = x.to(tl.float64)
    if LAYERNORM:
        mu = tl.sum(xd, axis=1) / H
        d = tl.where(mask, xd - mu[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / H
        c = tl.where(mask, x - mu.to(tl.float32)[:, None], 0.0)  # the centered input (masked lanes 0)
    else:
        var = tl.sum(xd * xd, axis=1) / H
        c = x
    rstd = (1.0 / tl.sqrt(var + tl.cast(eps, tl.float64))).to(tl.float32)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    y = c * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = rows64[:, None] * H  # row offsets in int64, column offsets in int32
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + out + cols[None, :], y, mask=mask)
    fold_tile_amax(y, mask, amax_ptr)

    # per-group E4M3 copy of the (centered) input (the arithmetic of quantize_per_group)
    group_quant_store(c, q_ptr, s_ptr, rows64, cols, mask, 0, R, H, NG, FMAX, G, BLOCK_R, BLOCK_H)


@fast_kernel
@triton.jit
def _norm_bwd_kernel(
    dy_ptr, q_ptr, s_ptr, rstd_ptr, w_ptr,  # dy: (R, H) strided; the rest as saved by the forward
    dx_ptr, dw_ptr, db_ptr,  # dx: (R, H) contiguous; dw, db: (num_programs, H) fp64 partial sums
    R, H, NG, stride_dyr, stride_dyh, n_blocks,
    LAYERNORM: tl.constexpr, HAS_W: tl.constexpr, HAS_DB: tl.constexpr,
    G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((1, BLOCK_H), dtype=tl.float64)
    db_acc = tl.zeros((1, BLOCK_H), dtype=tl.float64)
    for blk in tl.range(pid, n_blocks, tl.num_programs(0)):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        off = rows64[:, None] * H  # row offsets in int64, column offsets in int32
        xq = group_dequant_load(q_ptr, s_ptr, rows64, cols, mask, 0, R, H, NG, G, BLOCK_R, BLOCK_H)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, xq * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dyr + cols[None, :] * stride_dyh, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        # the dw/db updates come first: dy and the fp64 copies then die before the row reductions
        if HAS_W:
            dw_acc += tl.sum(dy.to(tl.float64) * xhat.to(tl.float64), axis=0, keep_dims=True)
        if HAS_DB:
            db_acc += tl.sum(dy.to(tl.float64), axis=0, keep_dims=True)
        g64 = g.to(tl.float64)
        if LAYERNORM:
            sum_g, sum_xg = tl.split(tl.sum(tl.join(g64, xhat.to(tl.float64) * g64), axis=1))  # one pass
            c1 = (sum_g / H).to(tl.float32)
            c2 = (sum_xg / H).to(tl.float32)
            u = g - c1[:, None]
        else:
            c2 = (tl.sum(xhat.to(tl.float64) * g64, axis=1) / H).to(tl.float32)
            u = g
        dx = rstd[:, None] * (u - xhat * c2[:, None])
        tl.store(dx_ptr + off + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(dw_ptr + pid * H + cols[None, :], dw_acc, mask=cmask[None, :])
    if HAS_DB:
        tl.store(db_ptr + pid * H + cols[None, :], db_acc, mask=cmask[None, :])


def _tiles(r: int, h: int, group_size: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps): a whole row per program (BLOCK_H = next_pow2(H)), rows up to _TILE_ELEMS;
    32 elements per thread in the forward, 16 in the backward (4 and 8 warps for a 4096-wide row), 4 to 16 warps.
    Chosen with scripts/kernel_sweep_gpu.py at the 7B's shapes (its results: docs/benchmarks.md)."""
    block_r, block_h = tile_2d(r, h, min_k=group_size, max_k=None, elems=_TILE_ELEMS)
    per_thread = 16 if backward else 32
    num_warps = max(4, min(16, block_r * block_h // (32 * per_thread)))
    return block_r, block_h, num_warps


def _bwd_programs(n_blocks: int, device: torch.device) -> int:
    """Programs of the backward launch (each loops over row blocks and keeps one fp64 partial dw/db row)."""
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 4
    return max(1, min(n_blocks, cap))


def norm_fwd_triton(x, weight, bias, eps, group_size, layernorm):
    h = x.shape[-1]
    ng = cdiv(h, group_size)
    lead = x.shape[:-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_q = torch.empty(x.shape, dtype=E4M3.dtype, device=x.device)
    x_s = torch.empty((*lead, ng), dtype=torch.float32, device=x.device)
    rstd = torch.empty(lead, dtype=torch.float32, device=x.device)
    amax = torch.zeros((), dtype=torch.int32, device=x.device)
    x2 = x.reshape(-1, h)
    r = x2.shape[0]
    if r == 0:
        return y, x_q, x_s, rstd, amax.view(torch.float32)
    block_r, block_h, num_warps = _tiles(r, h, group_size, backward=False)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    _norm_fwd_kernel[(cdiv(r, block_r),)](
        x2, w, b, y, x_q, x_s, rstd, amax,
        r, h, ng, x2.stride(0), x2.stride(1), f32(eps),
        LAYERNORM=layernorm, HAS_W=weight is not None, HAS_B=bias is not None,
        FMAX=E4M3.max, G=group_size, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return y, x_q, x_s, rstd, amax.view(torch.float32)


def norm_bwd_triton(dy, x_q, x_s, rstd, weight, group_size, layernorm, need_db):
    h = dy.shape[-1]
    ng = cdiv(h, group_size)
    dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    dy2 = dy.reshape(-1, h)
    r = dy2.shape[0]
    db_dtype = weight.dtype if weight is not None else dy.dtype
    if r == 0:
        dw = torch.zeros(h, dtype=weight.dtype, device=dy.device) if weight is not None else None
        db = torch.zeros(h, dtype=db_dtype, device=dy.device) if need_db else None
        return dx, dw, db
    block_r, block_h, num_warps = _tiles(r, h, group_size, backward=True)
    n_blocks = cdiv(r, block_r)
    nprog = _bwd_programs(n_blocks, dy.device)
    dw_part = torch.empty((nprog, h), dtype=torch.float64, device=dy.device) if weight is not None else dx
    db_part = torch.empty((nprog, h), dtype=torch.float64, device=dy.device) if need_db else dx
    _norm_bwd_kernel[(nprog,)](
        dy2, x_q.contiguous(), x_s.contiguous(), rstd.contiguous(),
        weight.contiguous() if weight is not None else dy2,
        dx, dw_part, db_part,
        r, h, ng, dy2.stride(0), dy2.stride(1), n_blocks,
        LAYERNORM=layernorm, HAS_W=weight is not None, HAS_DB=need_db,
        G=group_size, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).to(db_dtype) if need_db else None
    return dx, dw, db
