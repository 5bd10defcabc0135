"""RMSNorm and LayerNorm that save their input for the backward pass as FP8 (E4M3, 1×G per-group scales).

Shapes: ``x`` is ``(..., H)`` in bf16 / fp16 / fp32 (any leading shape, any strides, 0 rows allowed, H >= 1);
``weight`` / ``bias`` are ``(H,)`` or None. ``R`` below is the number of rows ``x.numel() // H``.

Forward (per row, x upcast to fp32 and, exactly, to fp64):

    RMSNorm    var  = Σ x² / H                                      (fp64 sum; x² is exact in fp64)
    LayerNorm  μ    = Σ x / H,  var = Σ (x − μ)² / H                (fp64, two passes over the row in registers)
               rstd = fp32( 1 / sqrt(var + fp32(eps)) )             (fp64 IEEE sqrt and division, one fp32 rounding)
               mean = fp32(μ)                                       (LayerNorm only)
    RMSNorm    y    = ((x · rstd) · w)                              (fp32, each product rounded, no FMA)
    LayerNorm  y    = (((x − mean) · rstd) · w) + b                 (fp32, same)
               y is cast once to x.dtype
    saved      x_q, x_s = quantize_per_group(x, E4M3, G)            (exactly ``quantization.reference`` semantics)

Outputs: ``y`` (x.shape, x.dtype), ``x_q`` (x.shape, float8_e4m3fn), ``x_s`` (..., ceil(H/G)) fp32,
``mean`` / ``rstd`` (...,) fp32. ``eps`` is rounded to fp32 before it is added in fp64.

Backward (per row; x̂ is rebuilt from the FP8 copy, so the input itself is never kept):

    x̂    = fp32(x_q) · x_s · rstd                  RMSNorm        (fp32)
    x̂    = (fp32(x_q) · x_s − mean) · rstd         LayerNorm      (fp32)
    g    = w · dy                                  (fp32; g = dy without weight)
    c2   = fp32( Σ x̂·g / H )                       (fp64 sum of exact fp64 products)
    c1   = fp32( Σ g / H )                         LayerNorm only (fp64 sum)
    dx   = rstd · (g − x̂·c2)                       RMSNorm        (fp32, cast to dy.dtype)
    dx   = rstd · ((g − c1) − x̂·c2)                LayerNorm      (fp32, cast to dy.dtype)
    dw   = Σ_rows dy·x̂,  db = Σ_rows dy            (fp64 sums, cast once to weight.dtype)

Backends: ``backend=None`` runs the Triton kernels on CUDA tensors and the torch reference elsewhere (like
``fp8coat.quantization.resolve_backend``). Both compute the same bits: every rounding step above is an IEEE
operation in both, the fp64 sums only differ in summation order (for bf16 inputs the sums of x and x² are
usually exact; otherwise a different fp32 result needs an fp64 rounding error to cross an fp32 rounding boundary,
about one row in 10^7), and the kernels run with FMA contraction disabled. Non-finite values stay in their row: a row holding inf or NaN gets
non-finite y and dx (and pollutes dw / db, which sum over rows); other rows are unaffected.

Autograd and ``torch.compile``: ``rmsnorm`` / ``layernorm`` call the custom ops ``fp8coat::rmsnorm`` /
``fp8coat::layernorm``, whose backward saves only ``x_q``, ``x_s``, ``rstd`` (+ ``mean``) and the weight:
H + 4·ceil(H/G) + 4 (+ 4) bytes per row instead of H·sizeof(x.dtype).
"""

import functools
from typing import Optional, Tuple

import torch

from .._grid import cdiv, next_power_of_2
from ..formats import E4M3
from ..quantization import resolve_backend
from ..quantization import reference as qref
from ..quantization.reference import check_group_size
from .eager import call, register_eager

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

__all__ = ["rmsnorm", "layernorm", "rmsnorm_fwd", "rmsnorm_bwd", "layernorm_fwd", "layernorm_bwd"]

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# argument checks and small exact helpers


def _check_inputs(x: torch.Tensor, group_size: int, *params: Optional[torch.Tensor]) -> int:
    check_group_size(group_size)
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"norm input must be one of {_X_DTYPES}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"norm input needs a non-empty last dimension, got shape {tuple(x.shape)}")
    h = x.shape[-1]
    for p in params:
        if p is not None and p.shape != (h,):
            raise ValueError(f"weight/bias must have shape ({h},), got {tuple(p.shape)}")
    return h


def _eps_f32(eps: float) -> float:
    """``eps`` rounded to fp32 (the value both backends add, in fp64)."""
    return float(torch.tensor(float(eps), dtype=torch.float32))


def _div64(a: torch.Tensor, n: int) -> torch.Tensor:
    """fp64 ``a / n`` as one IEEE division (tensor / python scalar is a reciprocal-multiply on CUDA)."""
    return torch.div(a, torch.full_like(a, float(n)))


def _sqrt64(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp64 sqrt: torch's vectorized CPU sqrt is not (~1% of float64 results are 1 ulp off)."""
    if a.device.type == "cpu":
        import numpy as np

        with np.errstate(invalid="ignore"):
            return torch.from_numpy(np.sqrt(a.detach().contiguous().numpy()))
    return torch.sqrt(a)


def _rstd_from_var(var: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32(1 / sqrt(var + fp32(eps))) from an fp64 ``var``."""
    root = _sqrt64(var + _eps_f32(eps))
    return torch.div(torch.ones_like(root), root).float()


# ---------------------------------------------------------------------------------------------------------------
# torch reference


def _norm_fwd_torch(x, weight, bias, eps, group_size, layernorm):
    h = x.shape[-1]
    xf = x.float()
    xd = xf.double()
    mean = None
    if layernorm:
        mu = _div64(xd.sum(-1), h)
        d = xd - mu.unsqueeze(-1)
        var = _div64((d * d).sum(-1), h)
        mean = mu.float()
        y = xf - mean.unsqueeze(-1)
    else:
        var = _div64((xd * xd).sum(-1), h)
        y = xf
    rstd = _rstd_from_var(var, eps)
    y = y * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    x_q, x_s = qref.quantize_per_group(x, E4M3, group_size)
    return y.to(x.dtype), x_q, x_s, mean, rstd


def _norm_bwd_torch(dy, x_q, x_s, mean, rstd, weight, group_size, layernorm, need_db):
    h = dy.shape[-1]
    xq = qref.dequantize_per_group(x_q, x_s, group_size)
    if layernorm:
        xq = xq - mean.unsqueeze(-1)
    xhat = xq * rstd.unsqueeze(-1)
    dyf = dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    c2 = _div64((xhat.double() * g.double()).sum(-1), h).float()
    if layernorm:
        c1 = _div64(g.double().sum(-1), h).float()
        u = g - c1.unsqueeze(-1)
    else:
        u = g
    dx = (rstd.unsqueeze(-1) * (u - xhat * c2.unsqueeze(-1))).to(dy.dtype)
    dw = db = None
    if weight is not None:
        dw = (dyf.double() * xhat.double()).reshape(-1, h).sum(0).to(weight.dtype)
    if need_db:
        db = dyf.double().reshape(-1, h).sum(0).to(weight.dtype if weight is not None else dy.dtype)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels

_TILE_ELEMS = 4096  # elements per program and row block (BLOCK_R * BLOCK_H, BLOCK_R >= 1)

if triton is not None:
    from .._launch import fast_kernel
    from ..quantization.reference import MIN_SCALE as _MIN_SCALE_PY
    from ..quantization.triton_kernels import _abs_nan_to_inf, _clamp_cast

    MIN_SCALE = tl.constexpr(_MIN_SCALE_PY)

    @fast_kernel
    @triton.jit
    def _norm_fwd_kernel(
        x_ptr, w_ptr, b_ptr,  # x: (R, H) strided; w, b: (H,)
        y_ptr, q_ptr, s_ptr, mean_ptr, rstd_ptr,  # y, q: (R, H); s: (R, NG); mean, rstd: (R,) — all contiguous
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
            mean = mu.to(tl.float32)
            tl.store(mean_ptr + rows, mean, mask=rmask)
            y = x - mean[:, None]
        else:
            var = tl.sum(xd * xd, axis=1) / H
            y = x
        rstd = (1.0 / tl.sqrt(var + tl.cast(eps, tl.float64))).to(tl.float32)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        y = y * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        out = rows64[:, None] * H  # row offsets in int64, column offsets in int32
        tl.store(y_ptr + out + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

        # per-group E4M3 copy of x (same arithmetic as quantization.triton_kernels._group_quant_kernel)
        x3 = tl.reshape(x, (BLOCK_R, BLOCK_H // G, G))
        s = tl.div_rn(tl.max(_abs_nan_to_inf(x3), axis=2), FMAX)
        s = tl.where(s < MIN_SCALE, MIN_SCALE, s)
        inv = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        q = _clamp_cast(tl.reshape(x3 * inv[:, :, None], (BLOCK_R, BLOCK_H)), FMAX, q_ptr.dtype.element_ty)
        tl.store(q_ptr + out + cols[None, :], q, mask=mask)
        gcols = tl.arange(0, BLOCK_H // G)
        tl.store(s_ptr + rows64[:, None] * NG + gcols[None, :], s, mask=rmask[:, None] & (gcols[None, :] < NG))

    @fast_kernel
    @triton.jit
    def _norm_bwd_kernel(
        dy_ptr, q_ptr, s_ptr, mean_ptr, rstd_ptr, w_ptr,  # dy: (R, H) strided; the rest as saved by the forward
        dx_ptr, dw_ptr, db_ptr,  # dx: (R, H) contiguous; dw, db: (num_programs, H) fp64 partial sums
        R, H, NG, stride_dyr, stride_dyh, n_blocks,
        LAYERNORM: tl.constexpr, HAS_W: tl.constexpr, HAS_DB: tl.constexpr,
        G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < H
        gcols = tl.arange(0, BLOCK_H // G)
        gmask = gcols < NG
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
            q = tl.load(q_ptr + off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rows64[:, None] * NG + gcols[None, :], mask=rmask[:, None] & gmask[None, :], other=1.0)
            xq = tl.reshape(tl.reshape(q, (BLOCK_R, BLOCK_H // G, G)) * s[:, :, None], (BLOCK_R, BLOCK_H))
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            if LAYERNORM:
                xq = xq - tl.load(mean_ptr + rows, mask=rmask, other=0.0)[:, None]
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


def _tiles(r: int, h: int, group_size: int) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps): a whole row per program (BLOCK_H = next_pow2(H)), rows up to _TILE_ELEMS."""
    block_h = max(group_size, next_power_of_2(h))
    block_r = max(1, min(next_power_of_2(max(r, 1)), _TILE_ELEMS // block_h))
    num_warps = max(4, min(16, block_r * block_h // 256))  # 8 elements per thread up to BLOCK_H = 4096
    return block_r, block_h, num_warps


def _bwd_programs(n_blocks: int, device: torch.device) -> int:
    """Programs of the backward launch (each loops over row blocks and keeps one fp64 partial dw/db row)."""
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 4
    return max(1, min(n_blocks, cap))


def _norm_fwd_triton(x, weight, bias, eps, group_size, layernorm):
    h = x.shape[-1]
    ng = cdiv(h, group_size)
    lead = x.shape[:-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_q = torch.empty(x.shape, dtype=E4M3.dtype, device=x.device)
    x_s = torch.empty((*lead, ng), dtype=torch.float32, device=x.device)
    rstd = torch.empty(lead, dtype=torch.float32, device=x.device)
    mean = torch.empty(lead, dtype=torch.float32, device=x.device) if layernorm else None
    x2 = x.reshape(-1, h)
    r = x2.shape[0]
    if r == 0:
        return y, x_q, x_s, mean, rstd
    block_r, block_h, num_warps = _tiles(r, h, group_size)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    _norm_fwd_kernel[(cdiv(r, block_r),)](
        x2, w, b, y, x_q, x_s, mean if layernorm else rstd, rstd,
        r, h, ng, x2.stride(0), x2.stride(1), _eps_f32(eps),
        LAYERNORM=layernorm, HAS_W=weight is not None, HAS_B=bias is not None,
        FMAX=E4M3.max, G=group_size, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return y, x_q, x_s, mean, rstd


def _norm_bwd_triton(dy, x_q, x_s, mean, rstd, weight, group_size, layernorm, need_db):
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
    block_r, block_h, num_warps = _tiles(r, h, group_size)
    n_blocks = cdiv(r, block_r)
    nprog = _bwd_programs(n_blocks, dy.device)
    dw_part = torch.empty((nprog, h), dtype=torch.float64, device=dy.device) if weight is not None else dx
    db_part = torch.empty((nprog, h), dtype=torch.float64, device=dy.device) if need_db else dx
    _norm_bwd_kernel[(nprog,)](
        dy2, x_q.contiguous(), x_s.contiguous(), mean.contiguous() if layernorm else rstd, rstd.contiguous(),
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


# ---------------------------------------------------------------------------------------------------------------
# public functional API (no autograd)


def _contig(*ts):
    return tuple(t.contiguous() if t is not None else None for t in ts)


def rmsnorm_fwd(x, weight, eps, group_size=16, *, backend=None):
    """RMSNorm forward -> ``(y, x_q, x_s, rstd)``; see the module docstring for the exact arithmetic."""
    _check_inputs(x, group_size, weight)
    impl = _norm_fwd_triton if resolve_backend(x, backend) == "triton" else _norm_fwd_torch
    y, x_q, x_s, _, rstd = impl(x, weight, None, float(eps), group_size, False)
    return _contig(y, x_q, x_s, rstd)


def rmsnorm_bwd(dy, x_q, x_s, rstd, weight, group_size=16, *, backend=None):
    """RMSNorm backward from the FP8 copy of x -> ``(dx, dw)`` (``dw`` None without weight)."""
    _check_inputs(dy, group_size, weight)
    impl = _norm_bwd_triton if resolve_backend(dy, backend) == "triton" else _norm_bwd_torch
    dx, dw, _ = impl(dy, x_q, x_s, None, rstd, weight, group_size, False, False)
    return _contig(dx, dw)


def layernorm_fwd(x, weight, bias, eps, group_size=16, *, backend=None):
    """LayerNorm forward -> ``(y, x_q, x_s, mean, rstd)``; weight and bias are optional."""
    _check_inputs(x, group_size, weight, bias)
    impl = _norm_fwd_triton if resolve_backend(x, backend) == "triton" else _norm_fwd_torch
    return _contig(*impl(x, weight, bias, float(eps), group_size, True))


def layernorm_bwd(dy, x_q, x_s, mean, rstd, weight, group_size=16, *, has_bias=None, backend=None):
    """LayerNorm backward from the FP8 copy of x -> ``(dx, dw, db)``.

    ``dw`` is None without weight; ``db`` is computed when ``has_bias`` (default: ``weight is not None``), in
    ``weight.dtype`` (``dy.dtype`` without weight).
    """
    _check_inputs(dy, group_size, weight)
    need_db = (weight is not None) if has_bias is None else bool(has_bias)
    impl = _norm_bwd_triton if resolve_backend(dy, backend) == "triton" else _norm_bwd_torch
    return _contig(*impl(dy, x_q, x_s, mean, rstd, weight, group_size, True, need_db))


# ---------------------------------------------------------------------------------------------------------------
# custom ops + autograd (eager and torch.compile)


def _empty_like_scales(x: torch.Tensor, group_size: int):
    h = x.shape[-1]
    lead = x.shape[:-1]
    x_q = x.new_empty(x.shape, dtype=E4M3.dtype)
    x_s = x.new_empty((*lead, (h + group_size - 1) // group_size), dtype=torch.float32)
    row = x.new_empty(lead, dtype=torch.float32)
    return x_q, x_s, row


def _rmsnorm_impl(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return rmsnorm_fwd(x, weight, eps, group_size)


_rmsnorm_op = torch.library.custom_op("fp8coat::rmsnorm", _rmsnorm_impl, mutates_args=())


@_rmsnorm_op.register_fake
def _(x, weight, eps, group_size):
    x_q, x_s, rstd = _empty_like_scales(x, group_size)
    return x.new_empty(x.shape), x_q, x_s, rstd


def _rmsnorm_backward_impl(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, rstd: torch.Tensor,
    weight: Optional[torch.Tensor], group_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    dx, dw = rmsnorm_bwd(dy, x_q, x_s, rstd, weight, group_size)
    return dx, dw if dw is not None else dy.new_empty(0)


_rmsnorm_backward_op = torch.library.custom_op("fp8coat::rmsnorm_backward", _rmsnorm_backward_impl,
                                               mutates_args=())


@_rmsnorm_backward_op.register_fake
def _(dy, x_q, x_s, rstd, weight, group_size):
    return dy.new_empty(dy.shape), weight.new_empty(weight.shape) if weight is not None else dy.new_empty(0)


def _rmsnorm_setup_context(ctx, inputs, output):
    _, weight, _, group_size = inputs
    _, x_q, x_s, rstd = output
    ctx.mark_non_differentiable(x_q, x_s, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors for the FP8 outputs' (absent) gradients
    ctx.save_for_backward(x_q, x_s, rstd, weight)
    ctx.group_size = group_size


def _rmsnorm_backward(ctx, dy, _dq, _ds, _drstd, _bwd=None):
    if dy is None:
        return None, None, None, None
    x_q, x_s, rstd, weight = ctx.saved_tensors
    dx, dw = (_bwd or _rmsnorm_backward_op)(dy, x_q, x_s, rstd, weight, ctx.group_size)
    return dx, (dw if weight is not None else None), None, None


torch.library.register_autograd("fp8coat::rmsnorm", _rmsnorm_backward, setup_context=_rmsnorm_setup_context)
register_eager(_rmsnorm_op, _rmsnorm_impl, _rmsnorm_setup_context,
               functools.partial(_rmsnorm_backward, _bwd=_rmsnorm_backward_impl))


def _layernorm_impl(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_fwd(x, weight, bias, eps, group_size)


_layernorm_op = torch.library.custom_op("fp8coat::layernorm", _layernorm_impl, mutates_args=())


@_layernorm_op.register_fake
def _(x, weight, bias, eps, group_size):
    x_q, x_s, rstd = _empty_like_scales(x, group_size)
    return x.new_empty(x.shape), x_q, x_s, torch.empty_like(rstd), rstd


def _layernorm_backward_impl(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: Optional[torch.Tensor], group_size: int, has_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layernorm_bwd(dy, x_q, x_s, mean, rstd, weight, group_size, has_bias=has_bias)
    return dx, dw if dw is not None else dy.new_empty(0), db if db is not None else dy.new_empty(0)


_layernorm_backward_op = torch.library.custom_op("fp8coat::layernorm_backward", _layernorm_backward_impl,
                                                 mutates_args=())


@_layernorm_backward_op.register_fake
def _(dy, x_q, x_s, mean, rstd, weight, group_size, has_bias):
    dw = weight.new_empty(weight.shape) if weight is not None else dy.new_empty(0)
    db_dtype = weight.dtype if weight is not None else dy.dtype
    db = dy.new_empty(dy.shape[-1:], dtype=db_dtype) if has_bias else dy.new_empty(0)
    return dy.new_empty(dy.shape), dw, db


def _layernorm_setup_context(ctx, inputs, output):
    _, weight, bias, _, group_size = inputs
    _, x_q, x_s, mean, rstd = output
    ctx.mark_non_differentiable(x_q, x_s, mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_q, x_s, mean, rstd, weight)
    ctx.group_size = group_size
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _layernorm_backward(ctx, dy, _dq, _ds, _dmean, _drstd, _bwd=None):
    if dy is None:
        return None, None, None, None, None
    x_q, x_s, mean, rstd, weight = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = (_bwd or _layernorm_backward_op)(dy, x_q, x_s, mean, rstd, weight, ctx.group_size, has_bias)
    return dx, (dw if weight is not None else None), (db.to(ctx.bias_dtype) if has_bias else None), None, None


torch.library.register_autograd("fp8coat::layernorm", _layernorm_backward, setup_context=_layernorm_setup_context)
register_eager(_layernorm_op, _layernorm_impl, _layernorm_setup_context,
               functools.partial(_layernorm_backward, _bwd=_layernorm_backward_impl))


def rmsnorm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, group_size: int = 16) -> torch.Tensor:
    """Differentiable RMSNorm whose backward keeps x only as FP8 (x_q, x_s) plus rstd."""
    return rmsnorm_with_saved(x, weight, eps, group_size)[0]


def rmsnorm_with_saved(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, group_size: int = 16):
    """RMSNorm returning ``(y, x_q, x_s, rstd)``: the output and the FP8 tensors its backward keeps (which a
    following FP8 linear layer can rebuild its input from)."""
    return call(_rmsnorm_op, x, weight, float(eps), group_size)


def layernorm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, group_size: int = 16
) -> torch.Tensor:
    """Differentiable LayerNorm whose backward keeps x only as FP8 (x_q, x_s) plus mean and rstd."""
    return call(_layernorm_op, x, weight, bias, float(eps), group_size)[0]
