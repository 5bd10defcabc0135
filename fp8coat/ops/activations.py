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

import math
import os

import torch
import triton
import triton.language as tl

from ..formats import E4M3
from ..quantization import resolve_backend
from ..quantization.reference import MIN_SCALE as _MIN_SCALE_PY
from ..quantization.reference import check_group_size, dequantize_per_group, quantize_per_group
from ..quantization.triton_kernels import _abs_nan_to_inf, _clamp_cast

try:  # the precise exp/erf of CUDA's math library (tl.exp lowers to the approximate ex2 instruction)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

__all__ = ["swiglu", "geglu", "gelu", "silu", "ACTIVATIONS"]

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

SQRT1_2 = tl.constexpr(_SQRT1_2)
INV_SQRT_2PI = tl.constexpr(_INV_SQRT_2PI)
K2 = tl.constexpr(_K2)
C = tl.constexpr(_C)
C3 = tl.constexpr(_C3)
TANH_CLAMP = tl.constexpr(_TANH_CLAMP)
MIN_SCALE = tl.constexpr(_MIN_SCALE_PY)


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
def _quant_store(x, q_ptr, s_ptr, rows, cols, mask, pid_k, R, K, NG,
                 FMAX: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-1×G quantization of the fp32 tile ``x`` (masked lanes hold 0); q (R, K) and s (R, NG) contiguous."""
    x3 = tl.reshape(x, (BLOCK_R, BLOCK_K // G, G))
    amax = tl.max(_abs_nan_to_inf(x3), axis=2)
    s = tl.div_rn(amax, FMAX)
    s = tl.where(s < MIN_SCALE, MIN_SCALE, s)
    inv = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    y = tl.reshape(x3 * inv[:, :, None], (BLOCK_R, BLOCK_K))
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _clamp_cast(y, FMAX, q_ptr.dtype.element_ty), mask=mask)
    gcols = pid_k * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
    tl.store(s_ptr + rows[:, None] * NG + gcols[None, :], s, mask=(rows[:, None] < R) & (gcols[None, :] < NG))


@triton.jit
def _dequant_load(q_ptr, s_ptr, rows, cols, mask, pid_k, R, K, NG,
                  G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    q = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gcols = pid_k * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
    s = tl.load(s_ptr + rows[:, None] * NG + gcols[None, :], mask=(rows[:, None] < R) & (gcols[None, :] < NG),
                other=1.0)
    return tl.reshape(tl.reshape(q, (BLOCK_R, BLOCK_K // G, G)) * s[:, :, None], (BLOCK_R, BLOCK_K))


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
    _quant_store(x, xq_ptr, xs_ptr, rows, cols, mask, pid_k, R, K, NG, FMAX, G, BLOCK_R, BLOCK_K)
    y = _act_tl(x, ACT, LIBDEVICE)
    if GATED:
        u = tl.load(u_ptr + rows[:, None] * stride_ur + cols[None, :] * stride_uk, mask=mask, other=0.0)
        u = u.to(tl.float32)
        _quant_store(u, uq_ptr, us_ptr, rows, cols, mask, pid_k, R, K, NG, FMAX, G, BLOCK_R, BLOCK_K)
        y = y * u
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


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
    block_k = max(group_size, min(max_k, triton.next_power_of_2(max(k, 1))))
    block_r = max(1, min(triton.next_power_of_2(max(r, 1)), elems // block_k))
    return block_r, block_k


def _launch_geometry(x2: torch.Tensor, group_size: int):
    r, k = x2.shape
    block_r, block_k = _tiles(r, k, group_size, x2.is_cuda and not _interpreting())
    k_tiles = triton.cdiv(k, block_k)
    return r, k, block_r, block_k, k_tiles, (triton.cdiv(r, block_r) * k_tiles,)


def _forward_triton(x: torch.Tensor, u: "torch.Tensor | None", act: int, group_size: int):
    n = x.shape[-1]
    ng = triton.cdiv(n, group_size)
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


def _backward_triton(dy, xq, xs, uq, us, act: int, group_size: int):
    n = dy.shape[-1]
    ng = triton.cdiv(n, group_size)
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
        return _forward_triton(x, u, act, group_size)
    return _forward_torch(x, u, act, group_size)


def activation_backward(dy, xq, xs, uq, us, act: int, group_size: int, backend: str):
    """(dx, du) (du None when ungated) from the saved FP8 inputs."""
    if backend == "triton":
        return _backward_triton(dy, xq, xs, uq, us, act, group_size)
    return _backward_torch(dy, xq, xs, uq, us, act, group_size)


def _fake_saved(x: torch.Tensor, group_size: int):
    ng = -(-x.shape[-1] // group_size)
    return x.new_empty(x.shape, dtype=FP8.dtype), x.new_empty((*x.shape[:-1], ng), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# custom ops: gated (swiglu, geglu)


@torch.library.custom_op("fp8coat::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, group_size: int, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(gate, up, ACTIVATIONS["silu"], group_size, backend))


@_swiglu_op.register_fake
def _(gate, up, group_size, backend):
    return (gate.new_empty(gate.shape), *_fake_saved(gate, group_size), *_fake_saved(up, group_size))


@torch.library.custom_op("fp8coat::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
                        up_s: torch.Tensor, group_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return activation_backward(dy, gate_q, gate_s, up_q, up_s, ACTIVATIONS["silu"], group_size, backend)


@_swiglu_backward_op.register_fake
def _(dy, gate_q, gate_s, up_q, up_s, group_size, backend):
    return dy.new_empty(dy.shape), dy.new_empty(dy.shape)


@torch.library.custom_op("fp8coat::geglu", mutates_args=())
def _geglu_op(gate: torch.Tensor, up: torch.Tensor, approximate: str, group_size: int, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(gate, up, _act_code("gelu", approximate), group_size, backend))


@_geglu_op.register_fake
def _(gate, up, approximate, group_size, backend):
    return (gate.new_empty(gate.shape), *_fake_saved(gate, group_size), *_fake_saved(up, group_size))


@torch.library.custom_op("fp8coat::geglu_backward", mutates_args=())
def _geglu_backward_op(dy: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
                       up_s: torch.Tensor, approximate: str, group_size: int, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return activation_backward(dy, gate_q, gate_s, up_q, up_s, _act_code("gelu", approximate), group_size, backend)


@_geglu_backward_op.register_fake
def _(dy, gate_q, gate_s, up_q, up_s, approximate, group_size, backend):
    return dy.new_empty(dy.shape), dy.new_empty(dy.shape)


def _setup_gated(ctx, inputs, output):
    _, gate_q, gate_s, up_q, up_s = output
    ctx.mark_non_differentiable(gate_q, gate_s, up_q, up_s)
    ctx.save_for_backward(gate_q, gate_s, up_q, up_s)
    ctx.args = inputs[2:]  # (approximate,) group_size, backend


def _swiglu_autograd(ctx, d_out, *unused):
    dg, du = _swiglu_backward_op(d_out, *ctx.saved_tensors, *ctx.args)
    return dg, du, None, None


def _geglu_autograd(ctx, d_out, *unused):
    dg, du = _geglu_backward_op(d_out, *ctx.saved_tensors, *ctx.args)
    return dg, du, None, None, None


torch.library.register_autograd("fp8coat::swiglu", _swiglu_autograd, setup_context=_setup_gated)
torch.library.register_autograd("fp8coat::geglu", _geglu_autograd, setup_context=_setup_gated)


# ---------------------------------------------------------------------------------------------------------------
# custom ops: plain (silu, gelu)


@torch.library.custom_op("fp8coat::silu", mutates_args=())
def _silu_op(x: torch.Tensor, group_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(x, None, ACTIVATIONS["silu"], group_size, backend))


@_silu_op.register_fake
def _(x, group_size, backend):
    return (x.new_empty(x.shape), *_fake_saved(x, group_size))


@torch.library.custom_op("fp8coat::silu_backward", mutates_args=())
def _silu_backward_op(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, group_size: int, backend: str
                      ) -> torch.Tensor:
    return activation_backward(dy, x_q, x_s, None, None, ACTIVATIONS["silu"], group_size, backend)[0]


@_silu_backward_op.register_fake
def _(dy, x_q, x_s, group_size, backend):
    return dy.new_empty(dy.shape)


@torch.library.custom_op("fp8coat::gelu", mutates_args=())
def _gelu_op(x: torch.Tensor, approximate: str, group_size: int, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(activation_forward(x, None, _act_code("gelu", approximate), group_size, backend))


@_gelu_op.register_fake
def _(x, approximate, group_size, backend):
    return (x.new_empty(x.shape), *_fake_saved(x, group_size))


@torch.library.custom_op("fp8coat::gelu_backward", mutates_args=())
def _gelu_backward_op(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, approximate: str, group_size: int,
                      backend: str) -> torch.Tensor:
    return activation_backward(dy, x_q, x_s, None, None, _act_code("gelu", approximate), group_size, backend)[0]


@_gelu_backward_op.register_fake
def _(dy, x_q, x_s, approximate, group_size, backend):
    return dy.new_empty(dy.shape)


def _setup_plain(ctx, inputs, output):
    _, x_q, x_s = output
    ctx.mark_non_differentiable(x_q, x_s)
    ctx.save_for_backward(x_q, x_s)
    ctx.args = inputs[1:]  # (approximate,) group_size, backend


def _silu_autograd(ctx, d_out, *unused):
    return _silu_backward_op(d_out, *ctx.saved_tensors, *ctx.args), None, None


def _gelu_autograd(ctx, d_out, *unused):
    return _gelu_backward_op(d_out, *ctx.saved_tensors, *ctx.args), None, None, None


torch.library.register_autograd("fp8coat::silu", _silu_autograd, setup_context=_setup_plain)
torch.library.register_autograd("fp8coat::gelu", _gelu_autograd, setup_context=_setup_plain)


# ---------------------------------------------------------------------------------------------------------------
# public API


def swiglu(gate: torch.Tensor, up: torch.Tensor, group_size: int = 16, *, backend: "str | None" = None
           ) -> torch.Tensor:
    """``silu(gate) · up``; saves gate and up as FP8 E4M3 with 1×G fp32 scales, recomputes silu in backward."""
    _check(gate, up, group_size)
    return _swiglu_op(gate, up, group_size, resolve_backend(gate, backend))[0]


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", group_size: int = 16, *,
          backend: "str | None" = None) -> torch.Tensor:
    """``gelu(gate, approximate) · up``; saves gate and up as FP8 E4M3 with 1×G fp32 scales."""
    _check(gate, up, group_size)
    _act_code("gelu", approximate)
    return _geglu_op(gate, up, approximate, group_size, resolve_backend(gate, backend))[0]


def silu(x: torch.Tensor, group_size: int = 16, *, backend: "str | None" = None) -> torch.Tensor:
    """``x · σ(x)``; saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    return _silu_op(x, group_size, resolve_backend(x, backend))[0]


def gelu(x: torch.Tensor, approximate: str = "none", group_size: int = 16, *, backend: "str | None" = None
         ) -> torch.Tensor:
    """``x · Φ(x)`` (``approximate="tanh"``: the tanh approximation); saves x as FP8 E4M3 with 1×G fp32 scales."""
    _check(x, None, group_size)
    _act_code("gelu", approximate)
    return _gelu_op(x, approximate, group_size, resolve_backend(x, backend))[0]
