"""RMSNorm and LayerNorm that save their input for the backward pass as FP8 (E4M3, 1×G per-group scales).

Shapes: ``x`` is ``(..., H)`` in bf16 / fp16 / fp32 (any leading shape, any strides, 0 rows allowed, H >= 1);
``weight`` / ``bias`` are ``(H,)`` or None. ``R`` below is the number of rows ``x.numel() // H``.

Forward (per row, x upcast to fp32 and, exactly, to fp64):

    RMSNorm    var  = Σ x² / H                                      (fp64 sum; x² is exact in fp64)
    LayerNorm  μ    = Σ x / H,  var = Σ (x − μ)² / H                (fp64, two passes over the row in registers)
               rstd = fp32( 1 / sqrt(var + fp32(eps)) )             (fp64 IEEE sqrt and division, one fp32 rounding)
               mean = fp32(μ)                                       (LayerNorm only)
    RMSNorm    c    = x                                             (fp32)
    LayerNorm  c    = x − mean                                      (fp32, rounded once)
               y    = ((c · rstd) · w) + b                          (fp32, each product rounded, no FMA; w, b
                                                                     when present: RMSNorm has no b)
               y is cast once to x.dtype
    saved      x_q, x_s = quantize_per_group(c, E4M3, G)            (exactly ``quantization.reference`` semantics)

LayerNorm keeps the centered input: its backward needs x − mean, and a copy of x itself would lose that difference
to the FP8 rounding whenever |mean| is large against the row's spread (a residual stream with an offset).

Outputs: ``y`` (x.shape, x.dtype), ``x_q`` (x.shape, float8_e4m3fn), ``x_s`` (..., ceil(H/G)) fp32, ``rstd``
(...,) fp32, ``y_amax`` 0-d fp32: max |y| over the whole output (NaN counts as +inf, 0 for no rows;
``quantization.tensor_amax(y)``), from which a following FP8 linear takes its per-tensor input scale without
reading y again. ``eps`` is rounded to fp32 before it is added in fp64.

Backward (per row; x̂ is rebuilt from the FP8 copy, so the input itself is never kept):

    x̂    = fp32(x_q) · x_s · rstd                  (fp32)
    g    = w · dy                                  (fp32; g = dy without weight)
    c2   = fp32( Σ x̂·g / H )                       (fp64 sum of exact fp64 products)
    c1   = fp32( Σ g / H )                         LayerNorm only (fp64 sum)
    dx   = rstd · (g − x̂·c2)                       RMSNorm        (fp32, cast to dy.dtype)
    dx   = rstd · ((g − c1) − x̂·c2)                LayerNorm      (fp32, cast to dy.dtype)
    dw   = Σ_rows dy·x̂,  db = Σ_rows dy            (fp64 sums, cast once to weight.dtype)

Backends: ``backend=None`` runs the Triton kernels (``norms_kernels.py``) on CUDA tensors and the torch reference
(here) elsewhere, like ``fp8coat.quantization.resolve_backend``. Both compute the same bits: every rounding step
above is an IEEE operation in both, the fp64 sums only differ in summation order (for bf16 inputs the sums of x
and x² are usually exact; otherwise a different fp32 result needs an fp64 rounding error to cross an fp32 rounding
boundary, about one row in 10^7), and the kernels run with FMA contraction disabled. Non-finite values stay in
their row: a row holding inf or NaN gets non-finite y and dx (and pollutes dw / db, which sum over rows); other
rows are unaffected.

Autograd and ``torch.compile``: ``rmsnorm`` / ``layernorm`` call the custom ops ``fp8coat::rmsnorm`` /
``fp8coat::layernorm``, whose backward saves only ``x_q``, ``x_s``, ``rstd`` and the weight: H + 4·ceil(H/G) + 4
bytes per row instead of H·sizeof(x.dtype).
"""

from __future__ import annotations

import functools

import torch

from .._grid import cdiv
from .._numerics import div64, f32, recip, sqrt64
from ..formats import E4M3
from ..quantization import reference as qref
from ..quantization import resolve_backend
from .eager import call, register_eager

__all__ = ["layernorm", "layernorm_bwd", "layernorm_fwd", "rmsnorm", "rmsnorm_bwd", "rmsnorm_fwd"]

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_inputs(x: torch.Tensor, group_size: int, *params: torch.Tensor | None) -> int:
    qref.check_group_size(group_size)
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"norm input must be one of {_X_DTYPES}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"norm input needs a non-empty last dimension, got shape {tuple(x.shape)}")
    h = x.shape[-1]
    for p in params:
        if p is not None and p.shape != (h,):
            raise ValueError(f"weight/bias must have shape ({h},), got {tuple(p.shape)}")
    return h


# ---------------------------------------------------------------------------------------------------------------
# torch reference


def _rstd_from_var(var: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32(1 / sqrt(var + fp32(eps))) from an fp64 ``var``."""
    return recip(sqrt64(var + f32(eps))).float()


def _norm_fwd_torch(x, weight, bias, eps, group_size, layernorm):
    h = x.shape[-1]
    xf = x.float()
    xd = xf.double()
    if layernorm:
        mu = div64(xd.sum(-1), h)
        d = xd - mu.unsqueeze(-1)
        var = div64((d * d).sum(-1), h)
        c = xf - mu.float().unsqueeze(-1)
    else:
        var = div64((xd * xd).sum(-1), h)
        c = xf
    rstd = _rstd_from_var(var, eps)
    y = c * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    x_q, x_s = qref.quantize_per_group(c, E4M3, group_size)
    y = y.to(x.dtype)
    return y, x_q, x_s, rstd, qref.tensor_amax(y)


def _norm_bwd_torch(dy, x_q, x_s, rstd, weight, group_size, layernorm, need_db):
    h = dy.shape[-1]
    xhat = qref.dequantize_per_group(x_q, x_s, group_size) * rstd.unsqueeze(-1)
    dyf = dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    c2 = div64((xhat.double() * g.double()).sum(-1), h).float()
    if layernorm:
        c1 = div64(g.double().sum(-1), h).float()
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
# public functional API (no autograd)


def _impls(x: torch.Tensor, backend):
    """(forward, backward) implementations of the backend that runs for ``x``."""
    if resolve_backend(x, backend) == "triton":
        from .norms_kernels import norm_bwd_triton, norm_fwd_triton

        return norm_fwd_triton, norm_bwd_triton
    return _norm_fwd_torch, _norm_bwd_torch


def _contig(*ts):
    return tuple(t.contiguous() if t is not None else None for t in ts)


def rmsnorm_fwd(x, weight, eps, group_size=16, *, backend=None):
    """RMSNorm forward -> ``(y, x_q, x_s, rstd, y_amax)``; see the module docstring for the exact arithmetic."""
    _check_inputs(x, group_size, weight)
    impl = _impls(x, backend)[0]
    y, x_q, x_s, rstd, y_amax = impl(x, weight, None, float(eps), group_size, False)
    return (*_contig(y, x_q, x_s, rstd), y_amax)


def rmsnorm_bwd(dy, x_q, x_s, rstd, weight, group_size=16, *, backend=None):
    """RMSNorm backward from the FP8 copy of x -> ``(dx, dw)`` (``dw`` None without weight)."""
    _check_inputs(dy, group_size, weight)
    impl = _impls(dy, backend)[1]
    dx, dw, _ = impl(dy, x_q, x_s, rstd, weight, group_size, False, False)
    return _contig(dx, dw)


def layernorm_fwd(x, weight, bias, eps, group_size=16, *, backend=None):
    """LayerNorm forward -> ``(y, x_q, x_s, rstd, y_amax)`` (x_q, x_s: the centered input x − mean); weight and bias
    are optional."""
    _check_inputs(x, group_size, weight, bias)
    impl = _impls(x, backend)[0]
    y, x_q, x_s, rstd, y_amax = impl(x, weight, bias, float(eps), group_size, True)
    return (*_contig(y, x_q, x_s, rstd), y_amax)


def layernorm_bwd(dy, x_q, x_s, rstd, weight, group_size=16, *, has_bias=None, backend=None):
    """LayerNorm backward from the FP8 copy of the centered x -> ``(dx, dw, db)``.

    ``dw`` is None without weight; ``db`` is computed when ``has_bias`` (default: ``weight is not None``), in
    ``weight.dtype`` (``dy.dtype`` without weight).
    """
    _check_inputs(dy, group_size, weight)
    need_db = (weight is not None) if has_bias is None else bool(has_bias)
    impl = _impls(dy, backend)[1]
    return _contig(*impl(dy, x_q, x_s, rstd, weight, group_size, True, need_db))


# ---------------------------------------------------------------------------------------------------------------
# custom ops + autograd (eager and torch.compile)


def _empty_like_scales(x: torch.Tensor, group_size: int):
    h = x.shape[-1]
    lead = x.shape[:-1]
    x_q = x.new_empty(x.shape, dtype=E4M3.dtype)
    x_s = x.new_empty((*lead, cdiv(h, group_size)), dtype=torch.float32)
    row = x.new_empty(lead, dtype=torch.float32)
    return x_q, x_s, row, x.new_empty((), dtype=torch.float32)


def _rmsnorm_impl(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return rmsnorm_fwd(x, weight, eps, group_size)


_rmsnorm_op = torch.library.custom_op("fp8coat::rmsnorm", _rmsnorm_impl, mutates_args=())


@_rmsnorm_op.register_fake
def _(x, weight, eps, group_size):
    x_q, x_s, rstd, y_amax = _empty_like_scales(x, group_size)
    return x.new_empty(x.shape), x_q, x_s, rstd, y_amax


def _rmsnorm_backward_impl(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = rmsnorm_bwd(dy, x_q, x_s, rstd, weight, group_size)
    return dx, dw if dw is not None else dy.new_empty(0)


_rmsnorm_backward_op = torch.library.custom_op("fp8coat::rmsnorm_backward", _rmsnorm_backward_impl,
                                               mutates_args=())


@_rmsnorm_backward_op.register_fake
def _(dy, x_q, x_s, rstd, weight, group_size):
    return dy.new_empty(dy.shape), weight.new_empty(weight.shape) if weight is not None else dy.new_empty(0)


def _rmsnorm_setup_context(ctx, inputs, output):
    _, weight, _, group_size = inputs
    _, x_q, x_s, rstd, y_amax = output
    ctx.mark_non_differentiable(x_q, x_s, rstd, y_amax)
    ctx.set_materialize_grads(False)  # no zero tensors for the FP8 outputs' (absent) gradients
    ctx.save_for_backward(x_q, x_s, rstd, weight)
    ctx.group_size = group_size


def _rmsnorm_backward(ctx, dy, _dq, _ds, _drstd, _damax, _bwd=None):
    if dy is None:
        return None, None, None, None
    x_q, x_s, rstd, weight = ctx.saved_tensors
    dx, dw = (_bwd or _rmsnorm_backward_op)(dy, x_q, x_s, rstd, weight, ctx.group_size)
    return dx, (dw if weight is not None else None), None, None


torch.library.register_autograd("fp8coat::rmsnorm", _rmsnorm_backward, setup_context=_rmsnorm_setup_context)
register_eager(_rmsnorm_op, _rmsnorm_impl, _rmsnorm_setup_context,
               functools.partial(_rmsnorm_backward, _bwd=_rmsnorm_backward_impl))


def _layernorm_impl(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_fwd(x, weight, bias, eps, group_size)


_layernorm_op = torch.library.custom_op("fp8coat::layernorm", _layernorm_impl, mutates_args=())


@_layernorm_op.register_fake
def _(x, weight, bias, eps, group_size):
    x_q, x_s, rstd, y_amax = _empty_like_scales(x, group_size)
    return x.new_empty(x.shape), x_q, x_s, rstd, y_amax


def _layernorm_backward_impl(
    dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, group_size: int, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layernorm_bwd(dy, x_q, x_s, rstd, weight, group_size, has_bias=has_bias)
    return dx, dw if dw is not None else dy.new_empty(0), db if db is not None else dy.new_empty(0)


_layernorm_backward_op = torch.library.custom_op("fp8coat::layernorm_backward", _layernorm_backward_impl,
                                                 mutates_args=())


@_layernorm_backward_op.register_fake
def _(dy, x_q, x_s, rstd, weight, group_size, has_bias):
    dw = weight.new_empty(weight.shape) if weight is not None else dy.new_empty(0)
    db_dtype = weight.dtype if weight is not None else dy.dtype
    db = dy.new_empty(dy.shape[-1:], dtype=db_dtype) if has_bias else dy.new_empty(0)
    return dy.new_empty(dy.shape), dw, db


def _layernorm_setup_context(ctx, inputs, output):
    _, weight, bias, _, group_size = inputs
    _, x_q, x_s, rstd, y_amax = output
    ctx.mark_non_differentiable(x_q, x_s, rstd, y_amax)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_q, x_s, rstd, weight)
    ctx.group_size = group_size
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _layernorm_backward(ctx, dy, _dq, _ds, _drstd, _damax, _bwd=None):
    if dy is None:
        return None, None, None, None, None
    x_q, x_s, rstd, weight = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = (_bwd or _layernorm_backward_op)(dy, x_q, x_s, rstd, weight, ctx.group_size, has_bias)
    return dx, (dw if weight is not None else None), (db.to(ctx.bias_dtype) if has_bias else None), None, None


torch.library.register_autograd("fp8coat::layernorm", _layernorm_backward, setup_context=_layernorm_setup_context)
register_eager(_layernorm_op, _layernorm_impl, _layernorm_setup_context,
               functools.partial(_layernorm_backward, _bwd=_layernorm_backward_impl))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, group_size: int = 16) -> torch.Tensor:
    """Differentiable RMSNorm whose backward keeps x only as FP8 (x_q, x_s) plus rstd."""
    return rmsnorm_with_saved(x, weight, eps, group_size)[0]


def rmsnorm_with_saved(x: torch.Tensor, weight: torch.Tensor | None, eps: float, group_size: int = 16):
    """RMSNorm returning ``(y, x_q, x_s, rstd, y_amax)``: the output, the FP8 tensors its backward keeps (which a
    following FP8 linear layer can rebuild its input from) and the amax of the output (its per-tensor scale)."""
    return call(_rmsnorm_op, x, weight, float(eps), group_size)


def layernorm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, group_size: int = 16
) -> torch.Tensor:
    """Differentiable LayerNorm whose backward keeps x − mean only as FP8 (x_q, x_s) plus rstd."""
    return layernorm_with_saved(x, weight, bias, eps, group_size)[0]


def layernorm_with_saved(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                         group_size: int = 16):
    """LayerNorm returning ``(y, x_q, x_s, rstd, y_amax)``: the output, the FP8 tensors its backward keeps (of the
    centered input, from which a following FP8 linear layer can rebuild its input) and the amax of the output."""
    return call(_layernorm_op, x, weight, bias, float(eps), group_size)
