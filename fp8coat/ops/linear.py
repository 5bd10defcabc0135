"""FP8 linear layers that save only FP8 inputs for backward.

For an input X (M×K, bf16/fp32), weights W_i (N_i×K) and optional biases b_i, sharing ONE quantized input:

    forward   X8, sX  = E4M3 per-tensor (scale from a two-stage amax, on device — or from ``x_amax``, the amax the op
                        producing X computed as it wrote X: FP8 norms and SwiGLU do)
              W8, sW  = E4M3 per-tensor (``weight_cache.weight_fp8``, before the op: with an
                        :class:`FP8WeightCache`, quantized again only when the weight's content changed)
              Y_i     = (X8·sX)(W8_i·sW_i)ᵀ + b_i         torch._scaled_mm on CUDA (fast accumulation), fp32
                                                           emulation elsewhere; output in X's dtype
              saved:  X8ᵀ (K×M_pad, FP8, the K-major copy wgrad needs), sX and the sW_i — or, with
                      ``save_input_hp``, the high-precision X itself when another op keeps it anyway (attention
                      output); nothing of X where no weight requires grad (frozen layers: no wgrad)
    backward  G8, sG  = ``bwd_format`` (E5M2 by default, or E4M3) per-tensor of [dY_1 … dY_n] side by side
                        (M × ΣN_i, one joint scale — from a pass over them, or from the amax the op consuming
                        the Y_i returned as the gradient of the op's ``grad_amax_link``), row-major and transposed
              Wᵀ8, sW' = E4M3 of [W_1ᵀ … W_nᵀ] side by side (K × ΣN_i), sW' = max_i sW_i (sW_1 for one layer)
              dX      = (G8·sG)(Wᵀ8·sW')ᵀ                 ONE GEMM over ΣN_i, as for a fused projection; precise
                                                           accumulation, in x's dtype
              dW_i    = (G8_iᵀ·sG)(X8·sX)                 in the weight's dtype, where a weight requires grad
              db_i    = Σ_rows dY_i

Hopper's FP8 GEMMs take both operands K-major ("TN"): the forward uses X8 (row-major) and W8 (row-major = W8ᵀ
column-major); dgrad needs Wᵀ8 row-major (re-quantized from W, transposed, in one kernel per layer — for one layer
with the cached scale, i.e. the bytes of the cached W8 transposed), wgrad needs G8ᵀ and X8ᵀ row-major, with the
token dimension (their inner dimension) padded with zeros to a multiple of 16.
``torch._scaled_mm`` also needs K and N to be multiples of 16: other sizes run the emulated GEMM (same
quantization, fp32 matmul).

Registered as the custom op ``fp8coat::linears`` with autograd, so ``torch.compile`` treats it as opaque; eager
calls run the same functions without the custom-op dispatch (``fp8coat.ops.eager.call``).
"""

from __future__ import annotations

import functools
import itertools

import torch

from .._grid import padded
from ..formats import E4M3, get_format
from ..quantization import joint_tensor_scale, quantize_transpose, scale_from_amax, tensor_scale
from .eager import call, register_eager
from .fp8_gather import GatheredFP8Weight, stand_in
from .recompute import Recompute, recompute_input, recompute_quantized_t
from .weight_cache import FP8WeightCache, weight_fp8

__all__ = ["FP8WeightCache", "Recompute", "linears", "linear", "fp8_mm", "fp8_gemm_supported", "recompute_input"]


# ---------------------------------------------------------------------------------------------------------------
# GEMM


def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and _capability(device.index) >= (8, 9)


@functools.cache
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


def _forward_impl(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    weights_fp8: list[torch.Tensor],
    weight_scales: list[torch.Tensor],
    weights_gathered: bool,
    biases: list[torch.Tensor],
    has_bias: list[bool],
    save_input_hp: bool,
    want_dw: bool,
    fast_accum: bool,
    emulate: bool,
    fwd_format: str,
    bwd_format: str,
    recompute_kind: str,
    recompute_src: list[torch.Tensor],
    recompute_group: int,
    x_amax: torch.Tensor | None,
    grad_amax_link: bool,
) -> list[torch.Tensor]:
    """Returns ``[*ys, x_saved, x_scale, link]``: outputs (…, N_i) in x's dtype, what backward needs, and the
    link: with ``grad_amax_link`` a 0-d fp32 zero whose gradient, when the op consuming the ``ys`` gives one, is
    the joint amax of the ``ys``' gradients (see :func:`linears`); else an empty tensor.

    ``weights_fp8[i]`` / ``weight_scales[i]``: ``weights[i]``'s E4M3 copy and 0-d fp32 scale
    (:func:`~fp8coat.ops.weight_cache.weight_fp8`); ``weights`` themselves are read only by the backward.
    ``weights_gathered``: the weights are FP8 all-gathered (:class:`~fp8coat.ops.fp8_gather.GatheredFP8Weight`):
    ``weights`` are then stand-ins (shape and dtype only) and the backward transposes the codes ``weights_fp8``
    instead of quantizing ``weights``.
    ``biases`` holds the biases of the layers with ``has_bias[i]``, in order (no None entries: the autograd
    wrapper of custom ops cannot return gradients for a list with holes). ``bwd_format`` is the gradients'
    format, used by the backward. ``want_dw``: the weight gradients will be computed; without them the input
    is not needed in backward and nothing of it is returned for saving (``x_saved`` is empty). ``x_amax``: None, or
    the 0-d fp32 amax of ``|x|`` (NaN as +inf) to take the scale from instead of reading x for it."""
    fmt = get_format(fwd_format)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    sx = tensor_scale(x2, fmt) if x_amax is None else scale_from_amax(x_amax, fmt)
    saves_own_copy = want_dw and not save_input_hp and not recompute_kind
    xq, xqt = quantize_transpose(x2, fmt, sx, rowwise=True, transposed=saves_own_copy)
    ys = []
    bias_iter = iter(biases)
    for w, wq, sw, hb in zip(weights, weights_fp8, weight_scales, has_bias):
        y = fp8_mm(xq, sx, wq, sw, x.dtype, fast_accum=fast_accum, emulate=emulate)
        if hb:
            y = y + next(bias_iter).to(y.dtype)
        ys.append(y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[0]))
    # otherwise setup_context saves x itself (save_input_hp) or the producer's tensors (recompute)
    saved = xqt if saves_own_copy else xq.new_empty(0)
    link = sx.new_zeros(()) if grad_amax_link else sx.new_empty((0,))
    return ys + [saved, sx, link]


_linears_fwd = torch.library.custom_op("fp8coat::linears", _forward_impl, mutates_args=())


@_linears_fwd.register_fake
def _(x, weights, weights_fp8, weight_scales, weights_gathered, biases, has_bias, save_input_hp, want_dw, fast_accum,
      emulate, fwd_format, bwd_format, recompute_kind, recompute_src, recompute_group, x_amax, grad_amax_link):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    k = x.shape[-1]
    ys = [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
    fp8 = get_format(fwd_format).dtype
    own = want_dw and not save_input_hp and not recompute_kind
    saved = x.new_empty((k, padded(m)), dtype=fp8) if own else x.new_empty((0,), dtype=fp8)
    link = x.new_empty((), dtype=torch.float32) if grad_amax_link else x.new_empty((0,), dtype=torch.float32)
    return ys + [saved, x.new_empty((), dtype=torch.float32), link]


def _backward_impl(
    grads: list[torch.Tensor],
    x_saved: torch.Tensor,
    x_scale: torch.Tensor,
    weights: list[torch.Tensor],
    w_scales: list[torch.Tensor],
    weights_fp8: list[torch.Tensor],
    has_bias: list[bool],
    x_shape: list[int],
    x_dtype: torch.dtype,
    save_input_hp: bool,
    want_dw: bool,
    emulate: bool,
    fwd_format: str,
    bwd_format: str,
    recompute_kind: str,
    recompute_src: list[torch.Tensor],
    recompute_group: int,
    grads_amax: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Returns ``[dx, *dw_i, *db_i (for biased layers)]`` (without the ``dw_i`` unless ``want_dw``).
    ``weights_fp8``: empty, or the FP8 codes of FP8 all-gathered weights (``weights`` are then stand-ins for their
    shape and dtype). ``grads_amax``: None, or the joint amax of the ``grads`` (0-d fp32, NaN as +inf) that the op
    consuming the outputs computed: their per-tensor scale comes from it instead of from a pass over them."""
    fmt, gfmt = get_format(fwd_format), get_format(bwd_format)
    k = x_shape[-1]
    m = 1
    for s in x_shape[:-1]:
        m *= s
    if not want_dw:
        xqt = None
    elif recompute_kind:
        xqt = recompute_quantized_t(recompute_kind, recompute_src, recompute_group, x_dtype, x_scale, fmt)
    elif save_input_hp:
        _, xqt = quantize_transpose(x_saved.reshape(-1, k), fmt, x_scale, rowwise=False)
    else:
        xqt = x_saved
    ns = [w.shape[0] for w in weights]
    g2s = [g if g.dim() == 2 else g.reshape(-1, n) for g, n in zip(grads, ns)]
    if len(weights) == 1:
        sg = tensor_scale(g2s[0], gfmt) if grads_amax is None else scale_from_amax(grads_amax, gfmt)
        sw = w_scales[0]
        gq, gqt = quantize_transpose(g2s[0], gfmt, sg, rowwise=True, transposed=want_dw)
        if weights_fp8:  # the codes are quantize(W, sw): their transpose is what quantizing Wᵀ gives
            wqt = weights_fp8[0].t().contiguous()
        else:
            _, wqt = quantize_transpose(weights[0].detach(), fmt, sw, rowwise=False, pad_to=1)
        gqts = [gqt]
    else:
        # the layers' input gradients in ONE GEMM, as for a fused projection: the dY_i side by side (M × ΣN_i) and
        # the W_iᵀ side by side (K × ΣN_i), each under one joint scale. Against a GEMM per layer summed in x's
        # dtype: n - 1 fewer GEMMs and no add passes.
        sg = joint_tensor_scale(g2s, gfmt) if grads_amax is None else scale_from_amax(grads_amax, gfmt)
        sw = functools.reduce(torch.maximum, w_scales)  # = scale_from_amax(max amax_i): the scale rule is monotone
        ends = list(itertools.accumulate(ns))
        device, m_pad = x_scale.device, padded(m)
        gq = torch.empty((m, ends[-1]), dtype=gfmt.dtype, device=device)
        gqt = torch.empty((ends[-1], m_pad), dtype=gfmt.dtype, device=device) if want_dw else None
        wqt = torch.empty((k, ends[-1]), dtype=fmt.dtype, device=device)
        gqts = []
        for i, (g2, w, end, n) in enumerate(zip(g2s, weights, ends, ns)):
            quantize_transpose(g2, gfmt, sg, transposed=want_dw, out=gq[:, end - n : end],
                               out_t=gqt[end - n : end] if want_dw else None)
            if weights_fp8:  # FP8-gathered: codes·sw_i re-quantized under the joint sw, i.e. codes / (sw / sw_i)
                w, s = weights_fp8[i], sw / w_scales[i]
            else:
                w, s = w.detach(), sw
            quantize_transpose(w, fmt, s, rowwise=False, pad_to=1, out_t=wqt[:, end - n : end])
            gqts.append(gqt[end - n : end] if want_dw else None)
    dx = fp8_mm(gq, sg, wqt, sw, x_dtype, emulate=emulate)
    dx = dx if len(x_shape) == 2 else dx.reshape(x_shape)
    dws = [fp8_mm(gt, sg, xqt, x_scale, w.dtype, emulate=emulate) for gt, w in zip(gqts, weights)
           ] if want_dw else []
    dbs = [g2.float().sum(0).to(w.dtype) for g2, w, hb in zip(g2s, weights, has_bias) if hb]
    return [dx] + dws + dbs


_linears_bwd = torch.library.custom_op("fp8coat::linears_backward", _backward_impl, mutates_args=())


@_linears_bwd.register_fake
def _(grads, x_saved, x_scale, weights, w_scales, weights_fp8, has_bias, x_shape, x_dtype, save_input_hp, want_dw,
      emulate, fwd_format, bwd_format, recompute_kind, recompute_src, recompute_group, grads_amax):
    dx = x_saved.new_empty(x_shape, dtype=x_dtype)
    dws = [torch.empty_like(w) for w in weights] if want_dw else []
    dbs = [w.new_empty((w.shape[0],)) for w, hb in zip(weights, has_bias) if hb]
    return [dx] + dws + dbs


def _setup(ctx, inputs, output):
    (x, weights, weights_fp8, w_scales, weights_gathered, _, has_bias, save_input_hp, want_dw, _, emulate,
     fwd_format, bwd_format, recompute_kind, recompute_src, recompute_group, _, grad_amax_link) = inputs
    n = len(weights)
    saved, x_scale, link = output[n], output[n + 1], output[n + 2]
    ctx.mark_non_differentiable(saved, x_scale, *([] if grad_amax_link else [link]))
    ctx.set_materialize_grads(False)  # outputs that do not reach the loss: None, handled in _backward
    if save_input_hp:
        saved = x
    codes = list(weights_fp8) if weights_gathered else []
    ctx.save_for_backward(saved, x_scale, *weights, *w_scales, *codes, *recompute_src)
    ctx.meta = dict(
        n_codes=len(codes), has_bias=list(has_bias), x_shape=list(x.shape), x_dtype=x.dtype,
        save_input_hp=save_input_hp, want_dw=want_dw, emulate=emulate, fwd_format=fwd_format, bwd_format=bwd_format,
        n=n, recompute=(recompute_kind, len(recompute_src), recompute_group),
    )


def _backward(ctx, grads, backward_fn=None):
    """Gradients in the custom op's input order from ``grads`` (those of the op's outputs); ``backward_fn``: the
    backward op (default: the registered custom op; the eager path passes the plain implementation)."""
    backward_fn = backward_fn or torch.ops.fp8coat.linears_backward
    meta = ctx.meta
    n = meta["n"]
    kind, n_src, group = meta["recompute"]
    saved, x_scale, *rest = ctx.saved_tensors
    n_codes = meta["n_codes"]
    weights, w_scales, codes = rest[:n], rest[n : 2 * n], rest[2 * n : 2 * n + n_codes]
    src = rest[2 * n + n_codes :]
    ys_grads = list(grads[:n])
    for i, g in enumerate(ys_grads):  # an output that did not reach the loss
        if g is None:
            ys_grads[i] = torch.zeros(*meta["x_shape"][:-1], weights[i].shape[0], dtype=meta["x_dtype"],
                                      device=x_scale.device)
    out = backward_fn(
        ys_grads, saved, x_scale, weights, list(w_scales), list(codes), meta["has_bias"], meta["x_shape"],
        meta["x_dtype"], meta["save_input_hp"], meta["want_dw"], meta["emulate"], meta["fwd_format"],
        meta["bwd_format"], kind, list(src), group, grads[n + 2],
    )
    if meta["want_dw"]:
        dx, dws, dbs = out[0], list(out[1 : 1 + n]), out[1 + n :]
    else:
        dx, dws, dbs = out[0], [None] * n, out[1:]
    return (dx, dws, [None] * n, [None] * n, None, list(dbs), None, None, None, None, None, None, None, None,
            [None] * n_src, None, None, None)


def _eager_backward(ctx, *grads):
    return _backward(ctx, grads, _backward_impl)


torch.library.register_autograd("fp8coat::linears", _backward, setup_context=_setup)
register_eager(_linears_fwd, _forward_impl, _setup, _eager_backward)


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
    bwd_format: str = "e5m2",
    recompute: "Recompute | None" = None,
    x_amax: "torch.Tensor | None" = None,
    grad_amax_link: bool = False,
) -> "list[torch.Tensor]":
    """Several FP8 linear layers on one input, quantized once: returns ``[x @ W_iᵀ + b_i]``.

    ``x``: (..., K) bf16/fp16/fp32; ``weights[i]``: (N_i, K) any float dtype (gradients come back in it);
    ``caches``: optional :class:`FP8WeightCache` per weight. ``fwd_format``: FP8 format of ``x`` and the weights;
    ``bwd_format``: of the output gradients (``e5m2`` or ``e4m3``; not both operands ``e5m2``). ``save_input_hp``
    keeps ``x`` itself for backward instead of its FP8 transposed copy (use it when ``x`` is saved by another op
    anyway); ``recompute`` saves nothing of ``x`` and rebuilds it in backward from its producer's saved FP8
    tensors. Where grad mode is off or no weight requires grad (frozen layers), nothing of ``x`` is saved (only
    the weight gradients need it) and backward computes the input and bias gradients only. ``x_amax``: the 0-d fp32
    max of ``|x|`` (NaN counted as +inf) where the op that produced ``x`` computed it (the FP8 norms and SwiGLU
    return it): ``x``'s per-tensor scale then comes from it instead of from one more pass over ``x``. It must be
    exactly ``x``'s amax (a smaller one clamps ``x``, a larger one wastes FP8 range).

    ``grad_amax_link``: also return a link, a 0-d fp32 tensor (value 0) after the outputs. Pass it to the op that
    consumes ALL the outputs and nothing else of them (``ops.activations.swiglu_with_saved`` for gate and up):
    that op's backward returns the joint amax of the outputs' gradients as the link's gradient, and this op's
    backward takes their per-tensor scale from it instead of from one more pass over them. The gradient reaches
    here through autograd like any other (nothing is stored on the side); a link nothing consumes gets no
    gradient, and the backward then reads the gradients for their scale as without it.
    """
    n = len(weights)
    biases = list(biases) if biases is not None else [None] * n
    caches = list(caches) if caches is not None else [None] * n
    gathered = [isinstance(w, GatheredFP8Weight) for w in weights]
    if any(gathered) and not all(gathered):
        raise ValueError("linears: FP8 all-gathered weights cannot share an input with other weights")
    is_gathered = bool(gathered) and all(gathered)
    if is_gathered:
        if get_format(fwd_format) != E4M3:
            raise ValueError(f"FP8 all-gathered weights are E4M3; this recipe's forward format is {fwd_format}")
        casts = [w.fp8() for w in weights]
        weights = [stand_in(w) for w in weights]  # the gradient reaches the gathered parameter through it
    else:
        casts = [weight_fp8(w, c, fwd_format) for w, c in zip(weights, caches)]
    want_dw = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    if not want_dw:
        save_input_hp, recompute = False, None
    present = [b for b in biases if b is not None]
    has_bias = [b is not None for b in biases]
    kind = recompute.kind if recompute else ""
    src = list(recompute.tensors) if recompute else []
    group = int(recompute.group_size) if recompute else 16
    out = call(_linears_fwd, x, list(weights), [c[0] for c in casts], [c[1] for c in casts], is_gathered,
               present, has_bias, save_input_hp, want_dw, fast_accum, emulate, fwd_format, bwd_format, kind, src,
               group, x_amax, grad_amax_link)
    return list(out[:n]) + ([out[n + 2]] if grad_amax_link else [])


def linear(x, weight, bias=None, cache: "FP8WeightCache | None" = None, **kwargs) -> torch.Tensor:
    """One FP8 linear layer: ``x @ weightᵀ + bias`` (see :func:`linears`)."""
    return linears(x, [weight], [bias], [cache], **kwargs)[0]
