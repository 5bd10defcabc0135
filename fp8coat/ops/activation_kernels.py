"""Triton kernels of the FP8-saving activation ops (``fp8coat.ops.activations``); imported only when the Triton
backend runs, so that ``import fp8coat`` works where Triton is not installed."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._grid import cdiv, next_power_of_2
from .._launch import fast_kernel
from ..quantization.reference import MIN_SCALE as _MIN_SCALE_PY
from ..quantization.triton_kernels import group_quant_store
from .activations import _C, _C3, _INV_SQRT_2PI, _K2, _SQRT1_2, _TANH_CLAMP, FP8

try:  # the precise exp/erf of CUDA's math library (tl.exp lowers to the approximate ex2 instruction)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

SQRT1_2 = tl.constexpr(_SQRT1_2)
INV_SQRT_2PI = tl.constexpr(_INV_SQRT_2PI)
K2 = tl.constexpr(_K2)
C = tl.constexpr(_C)
C3 = tl.constexpr(_C3)
TANH_CLAMP = tl.constexpr(_TANH_CLAMP)
MIN_SCALE = tl.constexpr(_MIN_SCALE_PY)


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _erf(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.erf(x)
    else:
        return tl.erf(x)


@triton.jit
def _recip_1p_tl(e):
    return tl.div_rn(tl.full(e.shape, 1.0, tl.float32), 1.0 + e)


@triton.jit
def _act_tl(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    if ACT == 0:
        y = x * _recip_1p_tl(_exp(-x, LIBDEVICE))
    elif ACT == 1:
        y = x * (0.5 * (1.0 + _erf(x * SQRT1_2, LIBDEVICE)))
    else:
        z2 = (x + C * (x * x * x)) * K2
        y = x * _recip_1p_tl(_exp(-z2, LIBDEVICE))
    return y


@triton.jit
def _act_grad_tl(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    if ACT == 0:
        s = _recip_1p_tl(_exp(-x, LIBDEVICE))
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + _erf(x * SQRT1_2, LIBDEVICE))
        d = cdf + x * (_exp(x * x * -0.5, LIBDEVICE) * INV_SQRT_2PI)
    else:
        x = tl.where(x > TANH_CLAMP, TANH_CLAMP, x)  # tl.where keeps NaN
        x = tl.where(x < -TANH_CLAMP, -TANH_CLAMP, x)
        z2 = (x + C * (x * x * x)) * K2
        e = _exp(-z2, LIBDEVICE)
        s = _recip_1p_tl(e)
        d = s + x * (s * (e * s)) * (K2 * (1.0 + C3 * (x * x)))
    return d


@triton.jit
def _dequant_load(q_ptr, s_ptr, rows, cols, mask, pid_k, R, K, NG,
                  G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    q = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gcols = pid_k * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
    s = tl.load(s_ptr + rows[:, None] * NG + gcols[None, :], mask=(rows[:, None] < R) & (gcols[None, :] < NG),
                other=1.0)
    return tl.reshape(tl.reshape(q, (BLOCK_R, BLOCK_K // G, G)) * s[:, :, None], (BLOCK_R, BLOCK_K))


@fast_kernel
@triton.jit
def _act_fwd_kernel(
    x_ptr, u_ptr, out_ptr, xq_ptr, xs_ptr, uq_ptr, us_ptr,  # x, u: (R, K) strided; the rest contiguous
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
    y = _act_tl(x, ACT, LIBDEVICE)
    if GATED:
        u = tl.load(u_ptr + rows[:, None] * stride_ur + cols[None, :] * stride_uk, mask=mask, other=0.0)
        u = u.to(tl.float32)
        group_quant_store(u, uq_ptr, us_ptr, rows, cols, mask, pid_k, R, K, NG, FMAX, G, BLOCK_R, BLOCK_K)
        y = y * u
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@fast_kernel
@triton.jit
def _act_bwd_kernel(
    dy_ptr, xq_ptr, xs_ptr, uq_ptr, us_ptr, dx_ptr, du_ptr,  # dy: (R, K) strided; the rest contiguous
    R, K, NG, K_TILES, stride_dr, stride_dk,
    ACT: tl.constexpr, GATED: tl.constexpr, G: tl.constexpr,
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
    x = _dequant_load(xq_ptr, xs_ptr, rows, cols, mask, pid_k, R, K, NG, G, BLOCK_R, BLOCK_K)
    fp = _act_grad_tl(x, ACT, LIBDEVICE)
    if GATED:
        u = _dequant_load(uq_ptr, us_ptr, rows, cols, mask, pid_k, R, K, NG, G, BLOCK_R, BLOCK_K)
        du = d * _act_tl(x, ACT, LIBDEVICE)
        tl.store(du_ptr + rows[:, None] * K + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        dx = (d * u) * fp
    else:
        dx = d * fp
    tl.store(dx_ptr + rows[:, None] * K + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_GPU_TILE = (1024, 2048, 4)  # (max BLOCK_K, elements per program, warps)


def _tiles(r: int, k: int, group_size: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K), powers of two: ~2K elements per program on the GPU (16 per thread per tensor with
    4 warps); 16K in the interpreter, where each program costs ~1.5 ms of Python."""
    max_k, elems = _GPU_TILE[:2] if on_gpu else (4096, 16384)
    block_k = max(group_size, min(max_k, next_power_of_2(max(k, 1))))
    block_r = max(1, min(next_power_of_2(max(r, 1)), elems // block_k))
    return block_r, block_k


def _launch_geometry(x2: torch.Tensor, group_size: int):
    r, k = x2.shape
    block_r, block_k = _tiles(r, k, group_size, x2.is_cuda and not _interpreting())
    k_tiles = cdiv(k, block_k)
    return r, k, block_r, block_k, k_tiles, (cdiv(r, block_r) * k_tiles,)


def forward_triton(x: torch.Tensor, u: "torch.Tensor | None", act: int, group_size: int):
    n = x.shape[-1]
    ng = cdiv(n, group_size)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    tensors = [torch.empty(x.shape, dtype=FP8.dtype, device=x.device),
               torch.empty((*x.shape[:-1], ng), dtype=torch.float32, device=x.device)]
    if u is not None:
        tensors += [torch.empty_like(tensors[0]), torch.empty_like(tensors[1])]
    if x.numel() == 0:
        return (out, *tensors)
    x2 = x.reshape(-1, n)
    u2 = u.reshape(-1, n) if u is not None else x2
    xq, xs = tensors[:2]
    uq, us = tensors[2:] if u is not None else tensors[:2]
    r, k, block_r, block_k, k_tiles, grid = _launch_geometry(x2, group_size)
    _act_fwd_kernel[grid](
        x2, u2, out, xq, xs, uq, us, r, k, ng, k_tiles, x2.stride(0), x2.stride(1), u2.stride(0), u2.stride(1),
        ACT=act, GATED=u is not None, FMAX=FP8.max, G=group_size, BLOCK_R=block_r, BLOCK_K=block_k,
        LIBDEVICE=x.is_cuda and not _interpreting() and libdevice is not None,
        num_warps=_GPU_TILE[2], enable_fp_fusion=False,
    )
    return (out, *tensors)


def backward_triton(dy, xq, xs, uq, us, act: int, group_size: int):
    n = dy.shape[-1]
    ng = cdiv(n, group_size)
    dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    du = torch.empty_like(dx) if uq is not None else None
    if dy.numel() == 0:
        return dx, du
    d2 = dy.reshape(-1, n)
    xq, xs = xq.contiguous(), xs.float().contiguous()
    if uq is not None:
        uq, us = uq.contiguous(), us.float().contiguous()
    r, k, block_r, block_k, k_tiles, grid = _launch_geometry(d2, group_size)
    _act_bwd_kernel[grid](
        d2, xq, xs, uq if uq is not None else xq, us if uq is not None else xs, dx, du if du is not None else dx,
        r, k, ng, k_tiles, d2.stride(0), d2.stride(1),
        ACT=act, GATED=uq is not None, G=group_size, BLOCK_R=block_r, BLOCK_K=block_k,
        LIBDEVICE=dy.is_cuda and not _interpreting() and libdevice is not None,
        num_warps=_GPU_TILE[2], enable_fp_fusion=False,
    )
    return dx, du
