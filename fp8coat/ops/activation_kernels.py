"""Triton kernels of the FP8-saving activation ops (``fp8coat.ops.activations``); imported only when the Triton
backend runs, so that ``import fp8coat`` works where Triton is not installed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, tile_2d
from .._kernel_helpers import (
    abs_nan_to_inf,
    act_grad_tl,
    act_tl,
    fold_tile_amax,
    group_dequant_load,
    group_quant_store,
    on_gpu,
    use_libdevice,
)
from .._launch import fast_kernel
from ..formats import E4M3

__all__ = ["backward_triton", "forward_triton"]


@fast_kernel
@triton.jit
def _act_fwd_kernel(
    x_ptr, u_ptr, out_ptr, xq_ptr, xs_ptr, uq_ptr, us_ptr,  # x, u: (R, K) strided; the rest contiguous
    amax_ptr,  # GATED: int32 (), zero on entry: the bits of amax(|out|) on exit
    R, K, NG, K_TILES, stride_xr, stride_xk, stride_ur, stride_uk,
    ACT: tl.constexpr, GATED: tl.constexpr, FMAX: tl.constexpr, G: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // K_TILES
    pid_k = pid % K_TILES
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    group_quant_store(x, xq_ptr, xs_ptr, rows, cols, mask, pid_k, R, K, NG, FMAX, G, BLOCK_R, BLOCK_K)
    y = act_tl(x, ACT, LIBDEVICE)
    if GATED:
        u = tl.load(u_ptr + rows[:, None] * stride_ur + cols[None, :] * stride_uk, mask=mask, other=0.0)
        u = u.to(tl.float32)
        group_quant_store(u, uq_ptr, us_ptr, rows, cols, mask, pid_k, R, K, NG, FMAX, G, BLOCK_R, BLOCK_K)
        y = y * u
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], y, mask=mask)
    if GATED:  # the gated op's output feeds a linear layer, which takes its scale from this amax
        fold_tile_amax(y, mask, amax_ptr)


@fast_kernel
@triton.jit
def _act_bwd_kernel(
    dy_ptr, xq_ptr, xs_ptr, uq_ptr, us_ptr, dx_ptr, du_ptr,  # dy: (R, K) strided; the rest contiguous
    amax_ptr,  # AMAX: int32 (), zero on entry: the bits of the joint amax(|dx|, |du|) on exit
    R, K, NG, K_TILES, stride_dr, stride_dk,
    ACT: tl.constexpr, GATED: tl.constexpr, AMAX: tl.constexpr, G: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // K_TILES
    pid_k = pid % K_TILES
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    d = tl.load(dy_ptr + rows[:, None] * stride_dr + cols[None, :] * stride_dk, mask=mask, other=0.0)
    d = d.to(tl.float32)
    x = group_dequant_load(xq_ptr, xs_ptr, rows, cols, mask, pid_k, R, K, NG, G, BLOCK_R, BLOCK_K)
    fp = act_grad_tl(x, ACT, LIBDEVICE)
    if GATED:
        u = group_dequant_load(uq_ptr, us_ptr, rows, cols, mask, pid_k, R, K, NG, G, BLOCK_R, BLOCK_K)
        du = (d * act_tl(x, ACT, LIBDEVICE)).to(du_ptr.dtype.element_ty)
        tl.store(du_ptr + rows[:, None] * K + cols[None, :], du, mask=mask)
        dx = (d * u) * fp
    else:
        dx = d * fp
    dx = dx.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + rows[:, None] * K + cols[None, :], dx, mask=mask)
    if AMAX:  # (gated only) both gradients feed one FP8 GEMM operand, whose joint scale this amax gives:
        # one reduction over the elementwise max of their magnitudes (NaN already +inf, so none is dropped)
        both = tl.maximum(abs_nan_to_inf(dx.to(tl.float32)), abs_nan_to_inf(du.to(tl.float32)))
        fold_tile_amax(both, mask, amax_ptr)


# (max BLOCK_K, elements per program, warps), chosen with scripts/kernel_sweep_gpu.py at the 7B's shapes
# (docs/benchmarks.md)
_GPU_TILE = (256, 1024, 2)


def _tiles(r: int, k: int, group_size: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K), powers of two: ~1K elements per program on the GPU (16 per thread per tensor with
    2 warps); 16K in the interpreter, where each program costs ~1.5 ms of Python."""
    max_k, elems = _GPU_TILE[:2] if on_gpu else (4096, 16384)
    return tile_2d(r, k, min_k=group_size, max_k=max_k, elems=elems)


def _launch_geometry(x2: torch.Tensor, group_size: int):
    r, k = x2.shape
    block_r, block_k = _tiles(r, k, group_size, on_gpu(x2.device))
    k_tiles = cdiv(k, block_k)
    return r, k, block_r, block_k, k_tiles, (cdiv(r, block_r) * k_tiles,)


def forward_triton(x: torch.Tensor, u: torch.Tensor | None, act: int, group_size: int):
    n = x.shape[-1]
    ng = cdiv(n, group_size)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    tensors = [torch.empty(x.shape, dtype=E4M3.dtype, device=x.device),
               torch.empty((*x.shape[:-1], ng), dtype=torch.float32, device=x.device)]
    amax = None
    if u is not None:
        tensors += [torch.empty_like(tensors[0]), torch.empty_like(tensors[1])]
        amax = torch.zeros((), dtype=torch.int32, device=x.device)
    result = (out, *tensors) if amax is None else (out, *tensors, amax.view(torch.float32))
    if x.numel() == 0:
        return result
    x2 = x.reshape(-1, n)
    u2 = u.reshape(-1, n) if u is not None else x2
    xq, xs = tensors[:2]
    uq, us = tensors[2:] if u is not None else tensors[:2]
    r, k, block_r, block_k, k_tiles, grid = _launch_geometry(x2, group_size)
    amax_slot = amax if amax is not None else xs  # not read without GATED
    _act_fwd_kernel[grid](
        x2, u2, out, xq, xs, uq, us, amax_slot,
        r, k, ng, k_tiles, x2.stride(0), x2.stride(1), u2.stride(0), u2.stride(1),
        ACT=act, GATED=u is not None, FMAX=E4M3.max, G=group_size, BLOCK_R=block_r, BLOCK_K=block_k,
        LIBDEVICE=use_libdevice(x),
        num_warps=_GPU_TILE[2], enable_fp_fusion=False,
    )
    return result


def backward_triton(dy, xq, xs, uq, us, act: int, group_size: int, want_amax: bool = False):
    """``(dx, du, amax)``: ``du`` None when ungated; ``amax`` (gated and ``want_amax`` only, else None) the 0-d
    fp32 joint max of ``|dx|`` and ``|du|`` as written (NaN as +inf)."""
    n = dy.shape[-1]
    ng = cdiv(n, group_size)
    dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    du = torch.empty_like(dx) if uq is not None else None
    amax = torch.zeros((), dtype=torch.int32, device=dy.device) if want_amax and uq is not None else None
    result = (dx, du, None if amax is None else amax.view(torch.float32))
    if dy.numel() == 0:
        return result
    d2 = dy.reshape(-1, n)
    xq, xs = xq.contiguous(), xs.float().contiguous()
    if uq is not None:
        uq, us = uq.contiguous(), us.float().contiguous()
    r, k, block_r, block_k, k_tiles, grid = _launch_geometry(d2, group_size)
    _act_bwd_kernel[grid](
        d2, xq, xs, uq if uq is not None else xq, us if uq is not None else xs, dx, du if du is not None else dx,
        amax if amax is not None else xs,  # (not read without AMAX)
        r, k, ng, k_tiles, d2.stride(0), d2.stride(1),
        ACT=act, GATED=uq is not None, AMAX=amax is not None, G=group_size, BLOCK_R=block_r, BLOCK_K=block_k,
        LIBDEVICE=use_libdevice(dy),
        num_warps=_GPU_TILE[2], enable_fp_fusion=False,
    )
    return result
