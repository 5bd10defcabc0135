"""Activation functions that save only their FP8-quantized inputs for backward.

Ops (all shapes ``(..., N)``, at least one dim; N any size; bf16 / fp16 / fp32; non-contiguous inputs allowed):

    swiglu(gate, up)                     = silu(gate) · up          (Llama MLP)
    geglu(gate, up, approximate)         = gelu(gate) · up
    silu(x)                              = x · σ(x)
    gelu(x, approximate)                 = x · Φ(x)                  ("none": erf;  "tanh": tanh approximation)
    quick_gelu(x)                        = x · σ(1.702 · x)          (HF ``quick_gelu``: CLIP, Qwen2-VL vision MLPs)

Memory. Forward saves each input ``t`` as ``(t_q, t_s) = quantize_per_group(t, E4M3, G)``: ``t_q`` float8_e4m3fn
with ``t``'s shape, ``t_s`` fp32 of shape ``(..., ceil(N / G))`` (exactly the rule of
``fp8coat.quantization.reference``). Nothing else is kept: not the output, not σ(gate), not silu(gate). SwiGLU
thus holds ``2·numel + 2·4·ceil(N/G)·rows`` bytes per call (2.5 bytes per output element at G = 16) where an
eager ``F.silu(g) * u`` keeps 3 bf16 tensors (g, u, silu(g): 6 bytes per output element).

Forward. The output is computed in fp32 from the original (unquantized) inputs and cast once to the input
dtype. Backward dequantizes the saved inputs to fp32 (``q · s``), recomputes the activation and its derivative
in fp32, and returns gradients in the input dtype (``dy``'s dtype):

    gated:      d_up   = dy · f(g)               d_gate = (dy · u) · f'(g)
    plain:      dx     = dy · f'(x)

with, in this evaluation order (every line is what both backends compute):

    silu        s = 1 / (1 + exp(-x))            f = x · s          f' = s · (1 + x · (1 - s))
    gelu        Φ = 0.5 · (1 + erf(x · 2^-½))    f = x · Φ          f' = Φ + x · (exp(x · x · -0.5) · (2π)^-½)
    gelu tanh   z2 = (x + C · (x · x · x)) · K2  s = 1 / (1 + exp(-z2))          f = x · s
                f' = s + x · (s · (e · s)) · (K2 · (1 + C3 · (x · x)))   with e = exp(-z2), x clamped to [-9, 9]
    quick_gelu  z = x · KQ                       s = 1 / (1 + exp(-z))           f = x · s
                f' = s · (1 + z · (1 - s))

where K2 = 2·√(2/π), C = 0.044715, C3 = 3·C, KQ = fp32(1.702). The tanh form is rewritten exactly with
0.5·(1 + tanh(z)) = σ(2z) and 1 - σ(2z) = e·σ(2z), which avoids the cancellation in 1 + tanh(z) and 1 - tanh²(z).
The derivative clamps x to [-9, 9] so that exp stays finite; beyond that range the exact derivative is 1 or 0 to
within 1e-26.

Backends. ``backend=None`` runs the Triton kernels for CUDA tensors and the torch reference otherwise;
``"torch"`` / ``"triton"`` force one. Both use the same operation order in fp32, IEEE division, and no FMA
contraction (kernels are compiled with ``enable_fp_fusion=False``). The saved FP8 tensors and scales are
bit-identical between backends (they depend only on the inputs). Outputs and gradients differ only where the
libraries' ``exp`` / ``erf`` differ in the last bit (tolerance in tests/test_activations.py). On an H200 the
Triton kernels (libdevice ``expf``) reproduce torch's CUDA results bit for bit for silu, swiglu and tanh-GELU;
erf-GELU differs in a few percent of fp32 elements (last bits of ``erff``).

Non-finite inputs. A NaN or ±inf in a 1×G group gives that group scale = inf, so its whole group dequantizes to
NaN in backward: the gradient of that group (and only that group, of that row) becomes NaN.

Autograd and ``torch.compile``: two ``torch.library.custom_op``, ``fp8coat::gated_activation`` (swiglu, geglu)
and ``fp8coat::activation`` (silu, gelu, quick_gelu), take the activation's code (``activation_math.ACTIVATIONS``)
and return ``(out, *saved)``; each has a fake implementation, a backward custom op (``..._backward``) and
``register_autograd`` saving only the FP8 tensors and scales, and is registered with ``eager.register_eager``.
The public functions return ``out``.
"""

from __future__ import annotations

import functools

import torch

from .._grid import cdiv
from ..formats import E4M3
from ..quantization import resolve_backend
from ..quantization.reference import check_group_size, dequantize_per_group, quantize_per_group, tensor_amax
from .activation_math import ACTIVATIONS, act_grad_torch, act_torch
from .eager import call, register_eager

__all__ = ["ACTIVATIONS", "geglu", "gelu", "quick_gelu", "silu", "swiglu", "swiglu_with_saved"]

_SILU = ACTIVATIONS["silu"]


def _gelu_code(approximate: str) -> int:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return ACTIVATIONS["gelu_tanh" if approximate == "tanh" else "gelu"]


def _check(x: torch.Tensor, u: torch.Tensor | None, group_size: int) -> None:
    check_group_size(group_size)
    if x.dim() == 0:
        raise ValueError("activation inputs need at least one dimension")
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"expected a float32/bfloat16/float16 input, got {x.dtype}")
    if u is not None and (u.shape != x.shape or u.dtype != x.dtype or u.device != x.device):
        raise ValueError(f"gate and up must have the same shape, dtype and device; got "
                         f"{tuple(x.shape)} {x.dtype} {x.device} and {tuple(u.shape)} {u.dtype} {u.device}")


# ---------------------------------------------------------------------------------------------------------------
# torch reference (fp32 math, same operation order as the kernels)


def _forward_torch(x: torch.Tensor, u: torch.Tensor | None, act: int, group_size: int):
    xq, xs = quantize_per_group(x, E4M3, group_size)
    y = act_torch(x.float(), act)
    saved = [xq, xs.contiguous()]
    if u is not None:
        uq, us = quantize_per_group(u, E4M3, group_size)
        y = y * u.float()
        saved += [uq, us.contiguous()]
    y = y.to(x.dtype).contiguous()
    return (y, *saved) if u is None else (y, *saved, tensor_amax(y))


def _backward_torch(dy, xq, xs, uq, us, act: int, group_size: int, want_amax: bool = False):
    x = dequantize_per_group(xq, xs, group_size, torch.float32)
    d = dy.float()
    fp = act_grad_torch(x, act)
    if uq is None:
        return (d * fp).to(dy.dtype).contiguous(), None, None
    u = dequantize_per_group(uq, us, group_size, torch.float32)
    du = (d * act_torch(x, act)).to(dy.dtype).contiguous()
    dx = ((d * u) * fp).to(dy.dtype).contiguous()
    return dx, du, torch.maximum(tensor_amax(dx), tensor_amax(du)) if want_amax else None


def _forward(x, u, act: int, group_size: int, backend: str):
    """(out, x_q, x_s) for f(x) (u None), (out, x_q, x_s, u_q, u_s, out_amax) for f(x)·u; ``backend`` is "torch" or
    "triton". ``out_amax``: 0-d fp32 max |out| (NaN counts as +inf; ``quantization.tensor_amax(out)``): the gated op
    feeds a linear layer, which takes its per-tensor scale from it."""
    if backend == "triton":
        from .activation_kernels import forward_triton

        return forward_triton(x, u, act, group_size)
    return _forward_torch(x, u, act, group_size)


def _backward(dy, xq, xs, uq, us, act: int, group_size: int, backend: str, want_amax: bool = False):
    """(dx, du, amax) from the saved FP8 inputs: du None when ungated; amax (gated with ``want_amax``, else None)
    the 0-d fp32 joint max of ``|dx|`` and ``|du|`` (NaN as +inf), computed as the kernel writes them."""
    if backend == "triton":
        from .activation_kernels import backward_triton

        return backward_triton(dy, xq, xs, uq, us, act, group_size, want_amax)
    return _backward_torch(dy, xq, xs, uq, us, act, group_size, want_amax)


# ---------------------------------------------------------------------------------------------------------------
# custom ops: gated f(gate)·up and plain f(x), ``act`` an ACTIVATIONS code


def _fake_saved(x: torch.Tensor, group_size: int):
    ng = cdiv(x.shape[-1], group_size)
    return x.new_empty(x.shape, dtype=E4M3.dtype), x.new_empty((*x.shape[:-1], ng), dtype=torch.float32)


def _gated_impl(gate: torch.Tensor, up: torch.Tensor, grad_amax_link: torch.Tensor | None, act: int,
                group_size: int, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # grad_amax_link is not read: only its gradient matters (the autograd formula below)
    return tuple(_forward(gate, up, act, group_size, backend))


_gated_op = torch.library.custom_op("fp8coat::gated_activation", _gated_impl, mutates_args=())


@_gated_op.register_fake
def _(gate, up, grad_amax_link, act, group_size, backend):
    return (gate.new_empty(gate.shape), *_fake_saved(gate, group_size), *_fake_saved(up, group_size),
            gate.new_empty((), dtype=torch.float32))


def _gated_backward_impl(dy: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
                         up_s: torch.Tensor, act: int, group_size: int, backend: str, want_amax: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up, amax)``; ``amax``: their joint amax (0-d fp32) with ``want_amax``, else an empty tensor."""
    dg, du, amax = _backward(dy, gate_q, gate_s, up_q, up_s, act, group_size, backend, want_amax)
    return dg, du, amax if amax is not None else dy.new_empty((0,), dtype=torch.float32)


_gated_backward_op = torch.library.custom_op("fp8coat::gated_activation_backward", _gated_backward_impl,
                                             mutates_args=())


@_gated_backward_op.register_fake
def _(dy, gate_q, gate_s, up_q, up_s, act, group_size, backend, want_amax):
    amax = dy.new_empty((), dtype=torch.float32) if want_amax else dy.new_empty((0,), dtype=torch.float32)
    return dy.new_empty(dy.shape), dy.new_empty(dy.shape), amax


def _plain_impl(x: torch.Tensor, act: int, group_size: int, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_forward(x, None, act, group_size, backend))


_plain_op = torch.library.custom_op("fp8coat::activation", _plain_impl, mutates_args=())


@_plain_op.register_fake
def _(x, act, group_size, backend):
    return (x.new_empty(x.shape), *_fake_saved(x, group_size))


def _plain_backward_impl(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, act: int, group_size: int,
                         backend: str) -> torch.Tensor:
    return _backward(dy, x_q, x_s, None, None, act, group_size, backend)[0]


_plain_backward_op = torch.library.custom_op("fp8coat::activation_backward", _plain_backward_impl, mutates_args=())


@_plain_backward_op.register_fake
def _(dy, x_q, x_s, act, group_size, backend):
    return dy.new_empty(dy.shape)


def _setup_context(ctx, inputs, output):
    # inputs: (x, act, group_size, backend) or (gate, up, grad_amax_link, act, group_size, backend);
    # output: (out, x_q, x_s) or (out, gate_q, gate_s, up_q, up_s, out_amax)
    gated = len(output) == 6
    saved = output[1:5] if gated else output[1:]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for the FP8 outputs' (absent) gradients
    ctx.save_for_backward(*saved)
    ctx.args = inputs[-3:]  # act, group_size, backend
    ctx.link = gated and inputs[2] is not None


def _gated_autograd(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None, None, None, None
    dg, du, amax = (_bwd or _gated_backward_op)(d_out, *ctx.saved_tensors, *ctx.args, ctx.link)
    return dg, du, amax if ctx.link else None, None, None, None


def _plain_autograd(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None, None
    return (_bwd or _plain_backward_op)(d_out, *ctx.saved_tensors, *ctx.args), None, None, None


torch.library.register_autograd("fp8coat::gated_activation", _gated_autograd, setup_context=_setup_context)
torch.library.register_autograd("fp8coat::activation", _plain_autograd, setup_context=_setup_context)
register_eager(_gated_op, _gated_impl, _setup_context, functools.partial(_gated_autograd, _bwd=_gated_backward_impl))
register_eager(_plain_op, _plain_impl, _setup_context, functools.partial(_plain_autograd, _bwd=_plain_backward_impl))


# ---------------------------------------------------------------------------------------------------------------
# public API


def swiglu(gate: torch.Tensor, up: torch.Tensor, group_size: int = 16, *, backend: str | None = None
           ) -> torch.Tensor:
    """``silu(gate) · up``; saves gate and up as FP8 E4M3 with 1×G fp32 scales, recomputes silu in backward."""
    return swiglu_with_saved(gate, up, group_size, backend=backend)[0]


def swiglu_with_saved(gate: torch.Tensor, up: torch.Tensor, group_size: int = 16, *,
                      grad_amax_link: "torch.Tensor | None" = None, backend: str | None = None):
    """SwiGLU returning ``(out, gate_q, gate_s, up_q, up_s, out_amax)``: the output, the FP8 tensors its backward
    keeps (which the following FP8 linear layer can rebuild its input from) and the amax of the output (its
    per-tensor scale).

    ``grad_amax_link``: the link :func:`fp8coat.ops.linear.linears` returned with ``gate`` and ``up`` (its only
    outputs, computed from one input): backward then returns the joint amax of the gate and up gradients as the
    link's gradient, which that op's backward takes their per-tensor scale from."""
    _check(gate, up, group_size)
    return call(_gated_op, gate, up, grad_amax_link, _SILU, group_size, resolve_backend(gate, backend))


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", group_size: int = 16, *,
          backend: str | None = None) -> torch.Tensor:
    """``gelu(gate, approximate) · up``; saves gate and up as FP8 E4M3 with 1×G fp32 scales."""
    _check(gate, up, group_size)
    return call(_gated_op, gate, up, None, _gelu_code(approximate), group_size, resolve_backend(gate, backend))[0]


def silu(x: torch.Tensor, group_size: int = 16, *, backend: str | None = None) -> torch.Tensor:
    """``x · σ(x)``; saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    return call(_plain_op, x, _SILU, group_size, resolve_backend(x, backend))[0]


def gelu(x: torch.Tensor, approximate: str = "none", group_size: int = 16, *, backend: str | None = None
         ) -> torch.Tensor:
    """``x · Φ(x)`` (``approximate="tanh"``: the tanh approximation); saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    return call(_plain_op, x, _gelu_code(approximate), group_size, resolve_backend(x, backend))[0]


def quick_gelu(x: torch.Tensor, group_size: int = 16, *, backend: str | None = None) -> torch.Tensor:
    """``x · σ(1.702 · x)`` (HF's ``QuickGELUActivation``); saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    return call(_plain_op, x, ACTIVATIONS["quick_gelu"], group_size, resolve_backend(x, backend))[0]
