"""AdamW step with FP8 moments — torch reference (the CPU path, and the oracle of the fused Triton kernel).

Per element, in fp32 (scalars rounded to fp32 once, host-side in float64 where they come from Python floats):

    p     = master(p) * (1 - lr·wd)                         decoupled weight decay on the pre-update value
    m     = m_old + (1-β1)·(g - m_old)                      torch's lerp (g - (g - m_old)·β1 when 1-β1 >= 0.5)
    v     = v_old·β2 + ((1-β2)·g)·g
    denom = sqrt(v) · (1/sqrt(1-β2^t)) + eps                 eps added after the bias-corrected sqrt(v)
    p     = p - ((lr / (1-β1^t)) · m) / denom
    m, v -> FP8 (state_codec.encode); p -> storage of the master-weight mode

The new unquantized m and v drive this step's update; quantization only affects later steps (as in COAT).
Every operation is an IEEE fp32 operation the Triton kernel performs in the same order (FMA contraction off),
so the two agree bit for bit except where ``log2``/``exp2`` of the FP8 codec differ in the last bit.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from .._numerics import ieee_div, ieee_sqrt
from . import state_codec
from .layout import MOMENTS, StateLayout
from .master_weights import join_bf16_remainder, split_bf16_remainder, stochastic_round_bf16, random16

__all__ = ["StepScalars", "step_constants", "adamw_step_reference"]


@dataclass(frozen=True)
class StepScalars:
    """Hyper-parameters of one step for one parameter group. ``lr`` may be a float or a 0-d tensor."""

    lr: "float | torch.Tensor"
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int  # 1-based step count after the increment
    maximize: bool = False


def _f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def step_constants(s: StepScalars) -> dict:
    """fp32-rounded host constants shared by the reference and the kernel (lr excluded: it may live on device)."""
    return {
        "one_minus_beta1": _f32(1.0 - s.beta1),
        "beta1": _f32(s.beta1),
        "beta2": _f32(s.beta2),
        "one_minus_beta2": _f32(1.0 - s.beta2),
        "eps": _f32(s.eps),
        "weight_decay": _f32(s.weight_decay),
        "bias_correction1": _f32(1.0 - s.beta1**s.step),
        "inv_bias_correction2_sqrt": _f32(1.0 / math.sqrt(1.0 - s.beta2**s.step)),
    }


def _lr_tensor(lr, device) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        return lr.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(lr, dtype=torch.float32, device=device)


def _read_moment(state: dict, key: str, layout: StateLayout) -> torch.Tensor:
    fmt = layout.format_of(key)
    if fmt is None:
        return state[key].float()
    return state_codec.decode(state[key], state[key + "_absmax"], state.get(key + "_expo"), fmt, layout.group_size)


def _write_moment(state: dict, key: str, value: torch.Tensor, layout: StateLayout) -> None:
    fmt = layout.format_of(key)
    if fmt is None:
        state[key].copy_(value)
        return
    q, absmax, expo = state_codec.encode(value, fmt, layout.group_size, layout.expand)
    state[key].copy_(q)
    state[key + "_absmax"].copy_(absmax)
    if expo is not None:
        state[key + "_expo"].copy_(expo)


def adamw_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    layout: StateLayout,
    scalars: StepScalars,
    sr_key: int = 0,
) -> None:
    """Update ``param`` and ``state`` in place (``state['step']`` must already hold ``scalars.step``).

    ``sr_key``: with ``bf16-stochastic`` masters, the 32-bit key of the rounding bits
    (``master_weights.random16(sr_key, element offsets)``, the same bits as the fused Triton step for this
    tensor)."""
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

    m_old = _read_moment(state, "exp_avg", layout)
    v_old = _read_moment(state, "exp_avg_sq", layout)

    p32 = p32 * wd_factor
    if c["one_minus_beta1"] < 0.5:
        m = m_old + c["one_minus_beta1"] * (g - m_old)
    else:
        m = g - (g - m_old) * c["beta1"]
    v = v_old * c["beta2"] + (c["one_minus_beta2"] * g) * g
    denom = ieee_sqrt(v) * c["inv_bias_correction2_sqrt"] + c["eps"]
    p32 = p32 - (step_size * m) / denom

    if layout.master == "bf16-remainder":
        hi, lo = split_bf16_remainder(p32)
        pv.copy_(hi)
        state["master_remainder"].copy_(lo)
    elif layout.master == "bf16-stochastic":
        rnd = random16(sr_key, torch.arange(pv.numel(), device=dev)).reshape(shape)
        pv.copy_(stochastic_round_bf16(p32, rnd))
    else:  # fp32 in place, or round-to-nearest into the param dtype
        pv.copy_(p32)

    for key, value in zip(MOMENTS, (m, v)):
        _write_moment(state, key, value, layout)
