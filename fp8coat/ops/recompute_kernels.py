"""Triton kernel of ``fp8coat.ops.recompute``: dequantize the producer's per-group FP8 tensors, apply RMSNorm's
scaling or SwiGLU, round to the linear input's dtype and store the per-tensor FP8 transposed copy — one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, padded
from .._kernel_helpers import act_tl, clamp_cast, group_dequant_load, use_libdevice
from .._launch import fast_kernel
from ..quantization import quantize_transpose
from .activation_math import ACTIVATIONS

__all__ = ["recompute_quantized_t_triton"]

_KINDS = {"rmsnorm": 0, "swiglu": 2}  # 1: rmsnorm with a weight
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SILU = tl.constexpr(ACTIVATIONS["silu"])


@fast_kernel
@triton.jit
def _recompute_kernel(
    a_q, a_s, b_q, b_s, rstd_ptr, w_ptr, scale_ptr, out_ptr,  # a/b: (M, K) fp8 + (M, NG) fp32, contiguous
    M, K, NG, M_PAD,
    KIND: tl.constexpr, ROUND: tl.constexpr, STORE_T: tl.constexpr, FMAX: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """STORE_T: out = qt (K, M_PAD) FP8, rows M..M_PAD zero; else out = x̂ (M, K) in its dtype."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = group_dequant_load(a_q, a_s, rows, cols, mask, pid_k, M, K, NG, G, BLOCK_M, BLOCK_K)
    if KIND == 2:
        u = group_dequant_load(b_q, b_s, rows, cols, mask, pid_k, M, K, NG, G, BLOCK_M, BLOCK_K)
        y = act_tl(x, SILU, LIBDEVICE) * u
    else:
        r = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        y = x * r[:, None]
        if KIND == 1:
            w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            y = y * w[None, :]
    if ROUND == 1:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        y = y.to(tl.float16).to(tl.float32)
    if STORE_T:
        y = tl.where(rows[:, None] < M, y, 0.0)  # padded rows: +0 (a negative weight would give -0)
        inv = tl.div_rn(1.0, tl.load(scale_ptr))
        # transpose the fp32 tile, then cast (as the quantize-transpose kernel); padded rows hold zeros
        qt = clamp_cast(tl.trans(y * inv), FMAX, out_ptr.dtype.element_ty)
        tmask = (cols[:, None] < K) & (rows[None, :] < M_PAD)
        tl.store(out_ptr + cols[:, None] * M_PAD + rows[None, :], qt, mask=tmask)
    else:
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def recompute_quantized_t_triton(kind, src, group_size: int, dtype: torch.dtype, scale: torch.Tensor, fmt,
                                 *, fused: bool = True, pad_to: int = 16) -> torch.Tensor:
    k = src[0].shape[-1]
    a_q = src[0].reshape(-1, k).contiguous()
    m = a_q.shape[0]
    m_pad = padded(m, pad_to)
    ng = src[1].shape[-1]
    a_s = src[1].reshape(m, ng).float().contiguous()
    code = _KINDS[kind]
    if dtype not in _ROUNDING:
        raise ValueError(f"recompute: unsupported input dtype {dtype}; expected one of {list(_ROUNDING)}")
    b_q, b_s, rstd, w = a_q, a_s, a_s, a_s  # placeholders for the pointers a kind does not read
    if kind == "swiglu":
        b_q = src[2].reshape(m, k).contiguous()
        b_s = src[3].reshape(m, ng).float().contiguous()
    else:
        rstd = src[2].reshape(m).float().contiguous()
        if len(src) > 3:
            code, w = 1, src[3].contiguous()
    scale = scale.float().reshape(())
    if fused:
        out = torch.empty((k, m_pad), dtype=fmt.dtype, device=a_q.device)
    else:
        out = torch.empty((m, k), dtype=dtype, device=a_q.device)
    if m_pad * k == 0:
        return out if fused else quantize_transpose(out, fmt, scale, rowwise=False, backend="triton")[1]
    # 64 × 128 tiles, 8 warps: chosen with scripts/kernel_sweep_gpu.py at the 7B's shapes (docs/benchmarks.md)
    block_m, block_k = 64, max(128, group_size)
    grid = (cdiv(m_pad if fused else m, block_m), cdiv(k, block_k))
    _recompute_kernel[grid](
        a_q, a_s, b_q, b_s, rstd, w, scale, out, m, k, ng, m_pad,
        KIND=code, ROUND=_ROUNDING[dtype], STORE_T=fused, FMAX=fmt.max, G=group_size, BLOCK_M=block_m,
        BLOCK_K=block_k, LIBDEVICE=use_libdevice(a_q),
        num_warps=8, enable_fp_fusion=False,
    )
    if fused:
        return out
    return quantize_transpose(out, fmt, scale, rowwise=False, backend="triton")[1]
