"""Activation functions that save only their FP8-quantized inputs for backward.

Ops (all shapes ``(..., N)``, at least one dim; N any size; bf16 / fp16 / fp32; non-contiguous inputs allowed):

    swiglu(gate, up)                     = silu(gate) · up          (Llama MLP)
    geglu(gate, up, approximate)         = gelu(gate) · up
    silu(x)                              = x · σ(x)
    gelu(x, approximate)                 = x · Φ(x)                  ("none": erf;  "tanh": tanh approximation)

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

where K2 = 2·√(2/π), C = 0.044715, C3 = 3·C. The tanh form is rewritten exactly with 0.5·(1 + tanh(z)) =
σ(2z) and 1 - σ(2z) = e·σ(2z), which avoids the cancellation in 1 + tanh(z) and 1 - tanh²(z). The derivative
clamps x to [-9, 9] so that exp stays finite; beyond that range the exact derivative is 1 or 0 to within 1e-26.

Backends. ``backend=None`` runs the Triton kernels for CUDA tensors and the torch reference otherwise;
``"torch"`` / ``"triton"`` force one. Both use the same operation order in fp32, IEEE division, and no FMA
contraction (kernels are compiled with ``enable_fp_fusion=False``). The saved FP8 tensors and scales are
bit-identical between backends (they depend only on the inputs). Outputs and gradients differ only where the
libraries' ``exp`` / ``erf`` differ in the last bit (tolerance in tests/test_activations.py). On an H200 the
Triton kernels (libdevice ``expf``) reproduce torch's CUDA results bit for bit for silu, swiglu and tanh-GELU;
erf-GELU differs in a few percent of fp32 elements (last bits of ``erff``).

Non-finite inputs. A NaN or ±inf in a 1×G group gives that group scale = inf, so its whole group dequantizes to
NaN in backward: the gradient of that group (and only that group, of that row) becomes NaN.

Autograd and ``torch.compile``: each op is a ``torch.library.custom_op`` (``fp8coat::swiglu`` ...) returning
``(out, *saved)``, with a fake implementation, a backward custom op (``fp8coat::swiglu_backward`` ...) and
``register_autograd`` saving only the FP8 tensors and scales. The public functions return ``out``.
"""

from __future__ import annotations

import functools
import math

import torch

from ..formats import E4M3
from ..quantization import resolve_backend
from ..quantization.reference import check_group_size, dequantize_per_group, quantize_per_group
from .eager import call, register_eager

__all__ = ["swiglu", "swiglu_with_saved", "geglu", "gelu", "silu", "ACTIVATIONS"]

FP8 = E4M3
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def _f32(v: float) -> float:
    """``v`` rounded to the nearest fp32 (constants are fp32 in both backends)."""
    return float(torch.tensor(v, dtype=torch.float32))


_SQRT1_2 = _f32(math.sqrt(0.5))
_INV_SQRT_2PI = _f32(1.0 / math.sqrt(2.0 * math.pi))
_K2 = _f32(2.0 * math.sqrt(2.0 / math.pi))
_C = _f32(0.044715)
_C3 = _f32(3.0 * 0.044715)
_TANH_CLAMP = 9.0



def _act_code(name: str, approximate: str = "none") -> int:
    if name == "gelu":
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        return ACTIVATIONS["gelu_tanh" if approximate == "tanh" else "gelu"]
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------------------------
# torch reference (fp32 math, same operation order as the kernels)


def _recip_1p(e: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + e)`` with one IEEE division."""
    return torch.div(torch.ones_like(e), 1.0 + e)


def _act_torch(x: torch.Tensor, act: int) -> torch.Tensor:
    """f(x) for fp32 ``x``."""
    if act == 0:
        return x * _recip_1p(torch.exp(-x))
    if act == 1:
        return x * (0.5 * (1.0 + torch.erf(x * _SQRT1_2)))
    z2 = (x + _C * (x * x * x)) * _K2
    return x * _recip_1p(torch.exp(-z2))


def _act_grad_torch(x: torch.Tensor, act: int) -> torch.Tensor:
    """f'(x) for fp32 ``x``."""
    if act == 0:
        s = _recip_1p(torch.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    if act == 1:
        cdf = 0.5 * (1.0 + torch.erf(x * _SQRT1_2))
        return cdf + x * (torch.exp(x * x * -0.5) * _INV_SQRT_2PI)
    x = torch.clamp(x, -_TANH_CLAMP, _TANH_CLAMP)
    z2 = (x + _C * (x * x * x)) * _K2
    e = torch.exp(-z2)
    s = _recip_1p(e)
    return s + x * (s * (e * s)) * (_K2 * (1.0 + _C3 * (x * x)))


def _forward_torch(x: torch.Tensor, u: "torch.Tensor | None", act: int, group_size: int):
    xq, xs = quantize_per_group(x, FP8, group_size)
    y = _act_torch(x.float(), act)
    saved = [xq, xs.contiguous()]
    if u is not None:
        uq, us = quantize_per_group(u, FP8, group_size)
        y = y * u.float()
        saved += [uq, us.contiguous()]
    return (y.to(x.dtype).contiguous(), *saved)


def _backward_torch(dy, xq, xs, uq, us, act: int, group_size: int):
    x = dequantize_per_group(xq, xs, group_size, torch.float32)
    d = dy.float()
    fp = _act_grad_torch(x, act)
    if uq is None:
        return (d * fp).to(dy.dtype).contiguous(), None
    u = dequantize_per_group(uq, us, group_size, torch.float32)
    du = d * _act_torch(x, act)
    dx = (d * u) * fp
    return dx.to(dy.dtype).contiguous(), du.to(dy.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels


# ---------------------------------------------------------------------------------------------------------------
# implementation entry points (dispatch on an already-resolved backend)


def _check(x: torch.Tensor, u: "torch.Tensor | None", group_size: int) -> None:
    check_group_size(group_size)
    if x.dim() == 0:
        raise ValueError("activation inputs need at least one dimension")
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"expected a float32/bfloat16/float16 input, got {x.dtype}")
    if u is not None and (u.shape != x.shape or u.dtype != x.dtype or u.device != x.device):
        raise ValueError(f"gate and up must have the same shape, dtype and device; got "
                         f"{tuple(x.shape)} {x.dtype} {x.device} and {tuple(u.shape)} {u.dtype} {u.device}")


def activation_forward(x, u, act: int, group_size: int, backend: str):
    """(out, x_q, x_s[, u_q, u_s]) for f(x) (u None) or f(x)·u; ``backend`` is "torch" or "triton"."""
    if backend == "triton":
        from .activation_kernels import forward_triton

        return forward_triton(x, u, act, group_size)
    return _forward_torch(x, u, act, group_size)


def activation_backward(dy, xq, xs, uq, us, act: int, group_size: int, backend: str):
    """(dx, du) (du None when ungated) from the saved FP8 inputs."""
    if backend == "triton":
        from .activation_kernels import backward_triton

        return backward_triton(dy, xq, xs, uq, us, act, group_size)
    return _backward_torch(dy, xq, xs, uq, us, act, group_size)


def _fake_saved(x: torch.Tensor, group_size: int):
    ng = -(-x.shape[-1] // group_size)
    return x.new_empty(x.shape, dtype=FP8.dtype), x.new_empty((*x.shape[:-1], ng), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# custom ops: gated (swiglu, geglu)


def _swiglu_op_impl(gate: torch.Tensor, up: torch.Tensor, group_size: int, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(gate, up, ACTIVATIONS["silu"], group_size, backend))


_swiglu_op = torch.library.custom_op("fp8coat::swiglu", _swiglu_op_impl, mutates_args=())


@_swiglu_op.register_fake
def _(gate, up, group_size, backend):
    return (gate.new_empty(gate.shape), *_fake_saved(gate, group_size), *_fake_saved(up, group_size))


def _swiglu_backward_op_impl(dy: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
                        up_s: torch.Tensor, group_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return activation_backward(dy, gate_q, gate_s, up_q, up_s, ACTIVATIONS["silu"], group_size, backend)


_swiglu_backward_op = torch.library.custom_op("fp8coat::swiglu_backward", _swiglu_backward_op_impl, mutates_args=())


@_swiglu_backward_op.register_fake
def _(dy, gate_q, gate_s, up_q, up_s, group_size, backend):
    return dy.new_empty(dy.shape), dy.new_empty(dy.shape)


def _geglu_op_impl(gate: torch.Tensor, up: torch.Tensor, approximate: str, group_size: int, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(gate, up, _act_code("gelu", approximate), group_size, backend))


_geglu_op = torch.library.custom_op("fp8coat::geglu", _geglu_op_impl, mutates_args=())


@_geglu_op.register_fake
def _(gate, up, approximate, group_size, backend):
    return (gate.new_empty(gate.shape), *_fake_saved(gate, group_size), *_fake_saved(up, group_size))


def _geglu_backward_op_impl(dy: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
                       up_s: torch.Tensor, approximate: str, group_size: int, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return activation_backward(dy, gate_q, gate_s, up_q, up_s, _act_code("gelu", approximate), group_size, backend)


_geglu_backward_op = torch.library.custom_op("fp8coat::geglu_backward", _geglu_backward_op_impl, mutates_args=())


@_geglu_backward_op.register_fake
def _(dy, gate_q, gate_s, up_q, up_s, approximate, group_size, backend):
    return dy.new_empty(dy.shape), dy.new_empty(dy.shape)


def _setup_gated(ctx, inputs, output):
    _, gate_q, gate_s, up_q, up_s = output
    ctx.mark_non_differentiable(gate_q, gate_s, up_q, up_s)
    ctx.set_materialize_grads(False)  # no zero tensors for the FP8 outputs' (absent) gradients
    ctx.save_for_backward(gate_q, gate_s, up_q, up_s)
    ctx.args = inputs[2:]  # (approximate,) group_size, backend


def _swiglu_autograd(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None, None
    dg, du = (_bwd or _swiglu_backward_op)(d_out, *ctx.saved_tensors, *ctx.args)
    return dg, du, None, None


def _geglu_autograd(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None, None, None
    dg, du = (_bwd or _geglu_backward_op)(d_out, *ctx.saved_tensors, *ctx.args)
    return dg, du, None, None, None


torch.library.register_autograd("fp8coat::swiglu", _swiglu_autograd, setup_context=_setup_gated)
torch.library.register_autograd("fp8coat::geglu", _geglu_autograd, setup_context=_setup_gated)
register_eager(_swiglu_op, _swiglu_op_impl, _setup_gated,
               functools.partial(_swiglu_autograd, _bwd=_swiglu_backward_op_impl))
register_eager(_geglu_op, _geglu_op_impl, _setup_gated,
               functools.partial(_geglu_autograd, _bwd=_geglu_backward_op_impl))


# ---------------------------------------------------------------------------------------------------------------
# custom ops: plain (silu, gelu)


def _silu_op_impl(x: torch.Tensor, group_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(x, None, ACTIVATIONS["silu"], group_size, backend))


_silu_op = torch.library.custom_op("fp8coat::silu", _silu_op_impl, mutates_args=())


@_silu_op.register_fake
def _(x, group_size, backend):
    return (x.new_empty(x.shape), *_fake_saved(x, group_size))


def _silu_backward_op_impl(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, group_size: int, backend: str
                      ) -> torch.Tensor:
    return activation_backward(dy, x_q, x_s, None, None, ACTIVATIONS["silu"], group_size, backend)[0]


_silu_backward_op = torch.library.custom_op("fp8coat::silu_backward", _silu_backward_op_impl, mutates_args=())


@_silu_backward_op.register_fake
def _(dy, x_q, x_s, group_size, backend):
    return dy.new_empty(dy.shape)


def _gelu_op_impl(x: torch.Tensor, approximate: str, group_size: int, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(x, None, _act_code("gelu", approximate), group_size, backend))


_gelu_op = torch.library.custom_op("fp8coat::gelu", _gelu_op_impl, mutates_args=())


@_gelu_op.register_fake
def _(x, approximate, group_size, backend):
    return (x.new_empty(x.shape), *_fake_saved(x, group_size))


def _gelu_backward_op_impl(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, approximate: str, group_size: int,
                      backend: str) -> torch.Tensor:
    return activation_backward(dy, x_q, x_s, None, None, _act_code("gelu", approximate), group_size, backend)[0]


_gelu_backward_op = torch.library.custom_op("fp8coat::gelu_backward", _gelu_backward_op_impl, mutates_args=())


@_gelu_backward_op.register_fake
def _(dy, x_q, x_s, approximate, group_size, backend):
    return dy.new_empty(dy.shape)


def _setup_plain(ctx, inputs, output):
    _, x_q, x_s = output
    ctx.mark_non_differentiable(x_q, x_s)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_q, x_s)
    ctx.args = inputs[1:]  # (approximate,) group_size, backend


def _silu_autograd(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None
    return (_bwd or _silu_backward_op)(d_out, *ctx.saved_tensors, *ctx.args), None, None


def _gelu_autograd(ctx, d_out, *unused, _bwd=None):
    if d_out is None:
        return None, None, None, None
    return (_bwd or _gelu_backward_op)(d_out, *ctx.saved_tensors, *ctx.args), None, None, None


torch.library.register_autograd("fp8coat::silu", _silu_autograd, setup_context=_setup_plain)
torch.library.register_autograd("fp8coat::gelu", _gelu_autograd, setup_context=_setup_plain)
register_eager(_silu_op, _silu_op_impl, _setup_plain, functools.partial(_silu_autograd, _bwd=_silu_backward_op_impl))
register_eager(_gelu_op, _gelu_op_impl, _setup_plain, functools.partial(_gelu_autograd, _bwd=_gelu_backward_op_impl))


# ---------------------------------------------------------------------------------------------------------------
# public API


def swiglu(gate: torch.Tensor, up: torch.Tensor, group_size: int = 16, *, backend: "str | None" = None
           ) -> torch.Tensor:
    """``silu(gate) · up``; saves gate and up as FP8 E4M3 with 1×G fp32 scales, recomputes silu in backward."""
    _check(gate, up, group_size)
    return swiglu_with_saved(gate, up, group_size, backend=backend)[0]


def swiglu_with_saved(gate: torch.Tensor, up: torch.Tensor, group_size: int = 16, *, backend: "str | None" = None):
    """SwiGLU returning ``(out, gate_q, gate_s, up_q, up_s)``: the output and the FP8 tensors its backward keeps
    (which the following FP8 linear layer can rebuild its input from)."""
    _check(gate, up, group_size)
    return call(_swiglu_op, gate, up, group_size, resolve_backend(gate, backend))


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", group_size: int = 16, *,
          backend: "str | None" = None) -> torch.Tensor:
    """``gelu(gate, approximate) · up``; saves gate and up as FP8 E4M3 with 1×G fp32 scales."""
    _check(gate, up, group_size)
    _act_code("gelu", approximate)
    return call(_geglu_op, gate, up, approximate, group_size, resolve_backend(gate, backend))[0]


def silu(x: torch.Tensor, group_size: int = 16, *, backend: "str | None" = None) -> torch.Tensor:
    """``x · σ(x)``; saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    return call(_silu_op, x, group_size, resolve_backend(x, backend))[0]


def gelu(x: torch.Tensor, approximate: str = "none", group_size: int = 16, *, backend: "str | None" = None
         ) -> torch.Tensor:
    """``x · Φ(x)`` (``approximate="tanh"``: the tanh approximation); saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    _act_code("gelu", approximate)
    return call(_gelu_op, x, approximate, group_size, resolve_backend(x, backend))[0]
