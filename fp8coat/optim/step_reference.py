"""AdamW step with FP8 moments — torch reference (the CPU path, and the oracle of the fused Triton kernel).

Per element, in fp32 (scalars rounded to fp32 once, host-side in float64 where they come from Python floats):

    ok    = |g| < inf                                       False for NaN and ±inf gradient elements
    p     = master(p) * (1 - lr·wd)                         decoupled weight decay on the pre-update value
    m     = m_old + (1-β1)·(g - m_old)                      torch's lerp (g - (g - m_old)·β1 when 1-β1 >= 0.5)
    v     = v_old·β2 + ((1-β2)·g)·g
    m     = ok ? clamp(m, -M_BOUND, M_BOUND) : m_old         M_BOUND = 2^63
    v     = ok ? min(v, V_BOUND) : v_old                     V_BOUND = 2^126 = M_BOUND²
    denom = sqrt(v) · (1/sqrt(1-β2^t)) + eps                 eps added after the bias-corrected sqrt(v)
    p     = ok ? p - ((lr / (1-β1^t)) · m) / denom : master(p)
    m, v -> FP8 (state_codec.encode); p -> storage of the master-weight mode

The new unquantized m and v drive this step's update; quantization only affects later steps (as in COAT).
Every operation is an IEEE fp32 operation the Triton kernel performs in the same order (FMA contraction off),
so the two agree bit for bit except where ``log2``/``exp2`` of the FP8 codec differ in the last bit.

Non-finite gradients: an element whose gradient is NaN or ±inf is left as it was (parameter, master remainder, m
and v; no weight decay); the rest of its tensor and quantization group update normally, and the number of such
elements is added to a counter. Finite gradients never make m or v non-finite: the bounds keep them, and every
value decoded from them, far from fp32's overflow; and with |m_old| <= 2^63 the difference ``g - m_old`` of
either lerp form rounds to a finite value for any finite g (2^63 is below half an ulp of fp32's top binade,
2^103), so no inf - inf arises. The update |step_size·m / denom| stays below 2^63·lr / ((1-β1^t)·eps), finite
for any sane lr and eps > 0. Torch's AdamW differs only beyond the bounds: a gradient with ((1-β2)·g)·g above
2^126 (|g| > 2.9e20 for β2 = 0.999) leaves v at 2^126 here, where torch's v grows further and overflows to inf
(freezing the element for good) from |g| > 5.8e20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._numerics import f32, ieee_div, ieee_sqrt
from ..quantization.reference import tensor_amax
from .layout import MOMENTS, StateLayout, read_moment, write_moment
from .master_weights import join_bf16_remainder, random16, split_bf16_remainder, stochastic_round_bf16

__all__ = ["M_BOUND", "V_BOUND", "StepScalars", "adamw_step_reference", "step_constants"]

M_BOUND = 2.0**63  # |m| <= M_BOUND after every step
V_BOUND = 2.0**126  # v <= V_BOUND after every step (= M_BOUND², so m / sqrt(v) stays of order 1 at the bounds)


@dataclass(frozen=True)
class StepScalars:
    """Hyper-parameters of one step for one parameter group. ``lr`` may be a float or a 0-d tensor."""

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int  # 1-based step count after the increment
    maximize: bool = False


def step_constants(s: StepScalars) -> dict:
    """fp32-rounded host constants shared by the reference and the kernel (lr excluded: it may live on device)."""
    return {
        "one_minus_beta1": f32(1.0 - s.beta1),
        "beta1": f32(s.beta1),
        "beta2": f32(s.beta2),
        "one_minus_beta2": f32(1.0 - s.beta2),
        "eps": f32(s.eps),
        "weight_decay": f32(s.weight_decay),
        "bias_correction1": f32(1.0 - s.beta1**s.step),
        "inv_bias_correction2_sqrt": f32(1.0 / math.sqrt(1.0 - s.beta2**s.step)),
    }


def _lr_tensor(lr, device) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        return lr.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(lr, dtype=torch.float32, device=device)


def adamw_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    layout: StateLayout,
    scalars: StepScalars,
    sr_key: int = 0,
    nonfinite_count: torch.Tensor | None = None,
    amax_out: torch.Tensor | None = None,
) -> None:
    """Update ``param`` and ``state`` in place (``state['step']`` must already hold ``scalars.step``).

    ``sr_key``: with ``bf16-stochastic`` masters, the 32-bit key of the rounding bits
    (``master_weights.random16(sr_key, element offsets)``, the same bits as the fused Triton step for this
    tensor). ``nonfinite_count``: an int64 0-d tensor on ``param``'s device to which the number of NaN/±inf
    gradient elements (left un-updated) is added; None: not counted. ``amax_out``: a 0-d fp32 tensor on ``param``'s
    device that receives ``tensor_amax`` of the parameter as stored (the values the fused step records)."""
    shape = state["exp_avg"].shape
    c = step_constants(scalars)
    dev = param.device
    lr = _lr_tensor(scalars.lr, dev)
    step_size = ieee_div(lr, c["bias_correction1"])
    wd_factor = 1.0 - lr * c["weight_decay"]

    g = grad.detach().reshape(shape).float()
    if scalars.maximize:
        g = -g
    pv = param.detach().reshape(shape)
    if layout.master == "bf16-remainder":
        p32 = join_bf16_remainder(pv, state["master_remainder"])
    else:
        p32 = pv.float()

    m_old = read_moment(state, "exp_avg", layout)
    v_old = read_moment(state, "exp_avg_sq", layout)

    ok = g.abs() < float("inf")
    p_old = p32
    p32 = p32 * wd_factor
    if c["one_minus_beta1"] < 0.5:
        m = m_old + c["one_minus_beta1"] * (g - m_old)
    else:
        m = g - (g - m_old) * c["beta1"]
    v = v_old * c["beta2"] + (c["one_minus_beta2"] * g) * g
    m = torch.where(ok, m.clamp(-M_BOUND, M_BOUND), m_old)
    v = torch.where(ok, v.clamp(max=V_BOUND), v_old)
    denom = ieee_sqrt(v) * c["inv_bias_correction2_sqrt"] + c["eps"]
    p32 = torch.where(ok, p32 - (step_size * m) / denom, p_old)
    if nonfinite_count is not None:
        nonfinite_count.add_((~ok).sum())

    if layout.master == "bf16-remainder":
        hi, lo = split_bf16_remainder(p32)
        pv.copy_(hi)
        state["master_remainder"].copy_(lo)
    elif layout.master == "bf16-stochastic":
        rnd = random16(sr_key, torch.arange(pv.numel(), device=dev)).reshape(shape)
        pv.copy_(stochastic_round_bf16(p32, rnd))
    else:  # fp32 in place, or round-to-nearest into the param dtype
        pv.copy_(p32)
    if amax_out is not None:
        amax_out.copy_(tensor_amax(pv))

    for key, value in zip(MOMENTS, (m, v)):
        write_moment(state, key, value, layout)
