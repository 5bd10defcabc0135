"""FP8 linear layers that save only FP8 inputs for backward.

For an input X (M×K, bf16/fp32), weights W_i (N_i×K) and optional biases b_i, sharing ONE quantized input:

    forward   X8, sX  = E4M3 per-tensor (scale from a two-stage amax, on device)
              W8, sW  = E4M3 per-tensor, cached per module while the weight's content is unchanged
                        (``weight_cache.py``: a content fingerprint checked on the device)
              Y_i     = (X8·sX)(W8_i·sW_i)ᵀ + b_i         torch._scaled_mm on CUDA (fast accumulation), fp32
                                                           emulation elsewhere; output in X's dtype
              saved:  X8ᵀ (K×M_pad, FP8, the K-major copy wgrad needs), sX and the sW_i — or, with
                      ``save_input_hp``, the high-precision X itself when another op keeps it anyway (attention
                      output)
    backward  G8, sG  = E5M2 per-tensor of [dY_1 … dY_n] side by side (M × ΣN_i, one joint scale), row-major
                        and transposed
              Wᵀ8, sW' = E4M3 of [W_1ᵀ … W_nᵀ] side by side (K × ΣN_i), sW' = max_i sW_i (sW_1 for one layer)
              dX      = (G8·sG)(Wᵀ8·sW')ᵀ                 ONE GEMM over ΣN_i, as for a fused projection; precise
                                                           accumulation, in x's dtype
              dW_i    = (G8_iᵀ·sG)(X8·sX)                 in the weight's dtype
              db_i    = Σ_rows dY_i

Hopper's FP8 GEMMs take both operands K-major ("TN"): the forward uses X8 (row-major) and W8 (row-major = W8ᵀ
column-major); dgrad needs Wᵀ8 row-major (re-quantized from W, transposed, in one kernel per layer — for one layer
with the cached scale, i.e. the bytes of the cached W8 transposed), wgrad needs G8ᵀ and X8ᵀ row-major, with the
token dimension (their inner dimension) padded with zeros to a multiple of 16.
``torch._scaled_mm`` also needs K and N to be multiples of 16: other sizes run the emulated GEMM (same
quantization, fp32 matmul).

Registered as the custom op ``fp8coat::linears`` with autograd, so ``torch.compile`` treats it as opaque; eager
calls run the same functions through a plain ``autograd.Function`` (see ``fp8coat.ops.eager``).
"""

from __future__ import annotations

import functools
import itertools

import torch

from ..formats import get_format
from ..quantization import joint_tensor_scale, quantize_transpose, tensor_scale
from .recompute import Recompute, recompute_input, recompute_quantized_t
from .weight_cache import FP8WeightCache, weight_fp8

__all__ = ["FP8WeightCache", "Recompute", "linears", "linear", "fp8_mm", "fp8_gemm_supported", "recompute_input"]


def _weight_fp8(w: torch.Tensor, handle: int, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    return weight_fp8(w, FP8WeightCache.lookup(handle) if handle > 0 else None, fmt)


# ---------------------------------------------------------------------------------------------------------------
# GEMM


def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and _capability(device.index) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _capability(index: "int | None") -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_mm(
    a: torch.Tensor, scale_a: torch.Tensor, b_t: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype,
    *, fast_accum: bool = False, emulate: bool = False,
) -> torch.Tensor:
    """``(a·scale_a) @ (b_t·scale_b)ᵀ`` for FP8 ``a`` (M×K) and ``b_t`` (N×K), both row-major; out (M×N).

    CUDA with FP8 tensor cores and K, N multiples of 16: ``torch._scaled_mm``. Otherwise the emulation computes
    the same product in fp32 (FP8 products are exact in fp32) and applies the scales at the end, like the GEMM.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if not emulate and fp8_gemm_supported(a.device) and k % 16 == 0 and n % 16 == 0:
        return torch._scaled_mm(a, b_t.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    out = (a.float() @ b_t.float().t()) * (scale_a.float() * scale_b.float())
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# custom ops


def _input_scale(x2: torch.Tensor, fmt) -> torch.Tensor:
    return tensor_scale(x2, fmt)


def _forward_impl(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    cache_handles: list[int],
    save_input_hp: bool,
    fast_accum: bool,
    emulate: bool,
    fwd_format: str,
    recompute_kind: str,
    recompute_src: list[torch.Tensor],
    recompute_eps: float,
    recompute_group: int,
) -> list[torch.Tensor]:
    """Returns ``[*ys, x_saved, x_scale, *w_scales]``: outputs (…, N_i) in x's dtype, then what backward needs.

    ``biases`` holds the biases of the layers with ``has_bias[i]``, in order (no None entries: the autograd
    wrapper of custom ops cannot return gradients for a list with holes)."""
    fmt = get_format(fwd_format)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    sx = _input_scale(x2, fmt)
    saves_own_copy = not save_input_hp and not recompute_kind
    xq, xqt = quantize_transpose(x2, fmt, sx, rowwise=True, transposed=saves_own_copy)
    ys, sws = [], []
    bias_iter = iter(biases)
    for w, hb, h in zip(weights, has_bias, cache_handles):
        b = next(bias_iter) if hb else None
        wq, sw = _weight_fp8(w, h, fmt)
        y = fp8_mm(xq, sx, wq, sw, x.dtype, fast_accum=fast_accum, emulate=emulate)
        if b is not None:
            y = y + b.to(y.dtype)
        ys.append(y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[0]))
        sws.append(sw)
    # otherwise setup_context saves x itself (save_input_hp) or the producer's tensors (recompute)
    saved = xqt if saves_own_copy else xq.new_empty(0)
    return ys + [saved, sx] + sws


_linears_fwd = torch.library.custom_op("fp8coat::linears", _forward_impl, mutates_args=())


@_linears_fwd.register_fake
def _(x, weights, biases, has_bias, cache_handles, save_input_hp, fast_accum, emulate, fwd_format, recompute_kind,
      recompute_src, recompute_eps, recompute_group):
    m = 1
    for s in x.shape[:-1]:
        m *= s
    k = x.shape[-1]
    ys = [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
    fp8 = get_format(fwd_format).dtype
    own = not save_input_hp and not recompute_kind
    saved = x.new_empty((k, -(-m // 16) * 16), dtype=fp8) if own else x.new_empty((0,), dtype=fp8)
    scales = [x.new_empty((), dtype=torch.float32) for _ in range(len(weights) + 1)]
    return ys + [saved] + scales


def _backward_impl(
    grads: list[torch.Tensor],
    x_saved: torch.Tensor,
    x_scale: torch.Tensor,
    weights: list[torch.Tensor],
    w_scales: list[torch.Tensor],
    has_bias: list[bool],
    x_shape: list[int],
    x_dtype: torch.dtype,
    save_input_hp: bool,
    emulate: bool,
    fwd_format: str,
    bwd_format: str,
    recompute_kind: str,
    recompute_src: list[torch.Tensor],
    recompute_eps: float,
    recompute_group: int,
) -> list[torch.Tensor]:
    """Returns ``[dx, *dw_i, *db_i (for biased layers)]``."""
    fmt, gfmt = get_format(fwd_format), get_format(bwd_format)
    k = x_shape[-1]
    m = 1
    for s in x_shape[:-1]:
        m *= s
    if recompute_kind:
        xqt = recompute_quantized_t(recompute_kind, recompute_src, recompute_group, x_dtype, x_scale, fmt)
    elif save_input_hp:
        _, xqt = quantize_transpose(x_saved.reshape(-1, k), fmt, x_scale, rowwise=False)
    else:
        xqt = x_saved
    ns = [w.shape[0] for w in weights]
    g2s = [g if g.dim() == 2 else g.reshape(-1, n) for g, n in zip(grads, ns)]
    if len(weights) == 1:
        sg, sw = _input_scale(g2s[0], gfmt), w_scales[0]
        gq, gqt = quantize_transpose(g2s[0], gfmt, sg, rowwise=True)
        _, wqt = quantize_transpose(weights[0].detach(), fmt, sw, rowwise=False, pad_to=1)
        gqts = [gqt]
    else:
        # the layers' input gradients in ONE GEMM, as for a fused projection: the dY_i side by side (M × ΣN_i) and
        # the W_iᵀ side by side (K × ΣN_i), each under one joint scale. Against a GEMM per layer summed in x's
        # dtype: n - 1 fewer GEMMs and no add passes (about 0.1 ms for q/k/v at 8192 × 4096 on an H200).
        sg = joint_tensor_scale(g2s, gfmt)
        sw = functools.reduce(torch.maximum, w_scales)  # = scale_from_amax(max amax_i): the scale rule is monotone
        ends = list(itertools.accumulate(ns))
        device, m_pad = x_scale.device, -(-m // 16) * 16
        gq = torch.empty((m, ends[-1]), dtype=gfmt.dtype, device=device)
        gqt = torch.empty((ends[-1], m_pad), dtype=gfmt.dtype, device=device)
        wqt = torch.empty((k, ends[-1]), dtype=fmt.dtype, device=device)
        gqts = []
        for g2, w, end, n in zip(g2s, weights, ends, ns):
            quantize_transpose(g2, gfmt, sg, out=gq[:, end - n : end], out_t=gqt[end - n : end])
            quantize_transpose(w.detach(), fmt, sw, rowwise=False, pad_to=1, out_t=wqt[:, end - n : end])
            gqts.append(gqt[end - n : end])
    dx = fp8_mm(gq, sg, wqt, sw, x_dtype, emulate=emulate)
    dx = dx if len(x_shape) == 2 else dx.reshape(x_shape)
    dws = [fp8_mm(gt, sg, xqt, x_scale, w.dtype, emulate=emulate) for gt, w in zip(gqts, weights)]
    dbs = [g2.float().sum(0).to(w.dtype) for g2, w, hb in zip(g2s, weights, has_bias) if hb]
    return [dx] + dws + dbs


_linears_bwd = torch.library.custom_op("fp8coat::linears_backward", _backward_impl, mutates_args=())


@_linears_bwd.register_fake
def _(grads, x_saved, x_scale, weights, w_scales, has_bias, x_shape, x_dtype, save_input_hp, emulate,
      fwd_format, bwd_format, recompute_kind, recompute_src, recompute_eps, recompute_group):
    dx = x_saved.new_empty(x_shape, dtype=x_dtype)
    dws = [torch.empty_like(w) for w in weights]
    dbs = [w.new_empty((w.shape[0],)) for w, hb in zip(weights, has_bias) if hb]
    return [dx] + dws + dbs


def _setup(ctx, inputs, output):
    (x, weights, biases, has_bias, handles, save_input_hp, fast_accum, emulate, fwd_format, recompute_kind,
     recompute_src, recompute_eps, recompute_group) = inputs
    n = len(weights)
    saved, x_scale, w_scales = output[n], output[n + 1], output[n + 2:]
    ctx.mark_non_differentiable(saved, x_scale, *w_scales)
    ctx.set_materialize_grads(False)  # outputs that do not reach the loss: None, handled in _backward
    if save_input_hp:
        saved = x
    ctx.save_for_backward(saved, x_scale, *weights, *w_scales, *recompute_src)
    ctx.meta = dict(
        has_bias=list(has_bias), x_shape=list(x.shape), x_dtype=x.dtype,
        save_input_hp=save_input_hp, emulate=emulate, fwd_format=fwd_format, n=len(weights),
        recompute=(recompute_kind, len(recompute_src), recompute_eps, recompute_group),
    )


def _backward(ctx, grads, backward_fn=None):
    """Gradients in the custom op's input order; ``backward_fn``: the backward op (default: the registered
    custom op; the eager path passes the plain implementation)."""
    backward_fn = backward_fn or torch.ops.fp8coat.linears_backward
    meta = ctx.meta
    n = meta["n"]
    kind, n_src, eps, group = meta["recompute"]
    saved, x_scale, *rest = ctx.saved_tensors
    weights, w_scales, src = rest[:n], rest[n : 2 * n], rest[2 * n :]
    ys_grads = list(grads[:n])
    for i, g in enumerate(ys_grads):  # an output that did not reach the loss
        if g is None:
            ys_grads[i] = torch.zeros(*meta["x_shape"][:-1], weights[i].shape[0], dtype=meta["x_dtype"],
                                      device=x_scale.device)
    out = backward_fn(
        ys_grads, saved, x_scale, weights, list(w_scales), meta["has_bias"], meta["x_shape"], meta["x_dtype"],
        meta["save_input_hp"], meta["emulate"], meta["fwd_format"], _BWD_FORMAT, kind, list(src), eps, group,
    )
    dx, dws, dbs = out[0], out[1 : 1 + n], out[1 + n :]
    return dx, list(dws), list(dbs), None, None, None, None, None, None, None, [None] * n_src, None, None


_BWD_FORMAT = "e5m2"
torch.library.register_autograd("fp8coat::linears", _backward, setup_context=_setup)


class _LinearsEager(torch.autograd.Function):
    """The eager path of ``fp8coat::linears``: the same forward, saved tensors and backward, called directly.

    Dispatching a ``torch.library`` custom op with autograd costs about as much host time per call as the op's
    own kernel launches; ``torch.compile`` (and anything that is not a plain tensor, e.g. fake tensors) goes
    through the registered op instead. ``tensors`` = weights, the biases present, the recompute sources.
    """

    @staticmethod
    def forward(ctx, args: tuple, x: torch.Tensor, *tensors: torch.Tensor):
        (n, n_bias, has_bias, handles, save_input_hp, fast_accum, emulate, fwd_format, kind, eps, group) = args
        weights, biases, src = list(tensors[:n]), list(tensors[n:n + n_bias]), list(tensors[n + n_bias:])
        inputs = (x, weights, biases, has_bias, handles, save_input_hp, fast_accum, emulate, fwd_format, kind, src,
                  eps, group)
        out = _forward_impl(*inputs)
        _setup(ctx, inputs, out)
        ctx.n_bias = n_bias
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        dx, dws, dbs, *_ = _backward(ctx, grads, _backward_impl)
        n_src = ctx.meta["recompute"][1]
        return (None, dx, *dws, *dbs, *([None] * n_src))


def _plain(tensors) -> bool:
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


# ---------------------------------------------------------------------------------------------------------------
# public functions


def linears(
    x: torch.Tensor,
    weights: "list[torch.Tensor]",
    biases: "list[torch.Tensor | None] | None" = None,
    caches: "list[FP8WeightCache | None] | None" = None,
    *,
    save_input_hp: bool = False,
    fast_accum: bool = True,
    emulate: bool = False,
    fwd_format: str = "e4m3",
    recompute: "Recompute | None" = None,
) -> "list[torch.Tensor]":
    """Several FP8 linear layers on one input, quantized once: returns ``[x @ W_iᵀ + b_i]``.

    ``x``: (..., K) bf16/fp16/fp32; ``weights[i]``: (N_i, K) any float dtype (gradients come back in it);
    ``caches``: optional :class:`FP8WeightCache` per weight. ``save_input_hp`` keeps ``x`` itself for backward
    instead of its FP8 transposed copy (use it when ``x`` is saved by another op anyway); ``recompute`` saves
    nothing of ``x`` and rebuilds it in backward from its producer's saved FP8 tensors.
    """
    n = len(weights)
    biases = list(biases) if biases is not None else [None] * n
    handles = [c.handle if c is not None else 0 for c in (caches or [None] * n)]
    present = [b for b in biases if b is not None]
    has_bias = [b is not None for b in biases]
    kind = recompute.kind if recompute else ""
    src = list(recompute.tensors) if recompute else []
    eps = float(recompute.eps) if recompute else 0.0
    group = int(recompute.group_size) if recompute else 16
    tensors = [*weights, *present, *src]
    if not torch.compiler.is_compiling() and _plain([x, *tensors]):
        args = (n, len(present), has_bias, handles, save_input_hp, fast_accum, emulate, fwd_format, kind, eps, group)
        out = _LinearsEager.apply(args, x, *tensors)
    else:
        out = torch.ops.fp8coat.linears(x, list(weights), present, has_bias, handles, save_input_hp, fast_accum,
                                        emulate, fwd_format, kind, src, eps, group)
    return list(out[:n])


def linear(x, weight, bias=None, cache: "FP8WeightCache | None" = None, **kwargs) -> torch.Tensor:
    """One FP8 linear layer: ``x @ weightᵀ + bias`` (see :func:`linears`)."""
    return linears(x, [weight], [bias], [cache], **kwargs)[0]
