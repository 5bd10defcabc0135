"""Per-parameter optimizer-state layout: which tensors a parameter's state holds, their dtypes and shapes.

State of one parameter ``p`` (shape ``(*lead, K)``; a 0-d parameter is treated as shape ``(1,)``):

============================  ==================  =================================  ===========================
key                           dtype               shape                              when
============================  ==================  =================================  ===========================
``step``                      fp32 (CPU, 0-d)     ()                                 always
``exp_avg`` / ``exp_avg_sq``  fp8 or fp32         ``p.shape``                        always
``exp_avg_absmax`` / ...sq    fp32                ``(*lead, ceil(K/G))``             FP8 moments
``exp_avg_expo`` / ...sq      uint8 (k·16)        ``(*lead, ceil(K/G))``             FP8 moments with expansion
``master_remainder``          int16               ``p.shape``                        ``bf16-remainder`` mode
============================  ==================  =================================  ===========================

Bytes per element of a large matrix with FP8 moments, G = 128, expansion on: 2 (m, v) + 2·5/128 = 2.078.

A layout follows from the parameter (dims, numel, dtype) and its group's options (:data:`OPTION_KEYS`); the
optimizer records, per parameter, the layout, dtype and device its state was made for and converts the state
(``state_conversion.py``) when any of them changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import FP8Format
from . import state_codec
from .state_codec import side_shape

__all__ = ["StateLayout", "MOMENTS", "OPTION_KEYS", "group_options", "has_fp8_moments", "state_shape", "init_state",
           "init_moment", "read_moment", "write_moment", "state_nbytes"]

MOMENTS = ("exp_avg", "exp_avg_sq")
MOMENT_SUFFIXES = ("", "_absmax", "_expo")  # a moment's codes and its per-group side tensors

# the parameter-group options a layout is derived from
OPTION_KEYS = ("m_format", "v_format", "group_size", "expansion", "min_quantized_numel", "master_weights")


def group_options(group: dict) -> tuple:
    """The values of :data:`OPTION_KEYS` in ``group`` (a small tuple: compared every step to notice changes)."""
    return tuple(group[k] for k in OPTION_KEYS)


@dataclass(frozen=True)
class StateLayout:
    """How one parameter's state is stored; parameters sharing a layout share one fused kernel launch.

    ``m_format`` / ``v_format`` are None for fp32 moments (small or 1-D parameters).
    """

    m_format: "FP8Format | None"
    v_format: "FP8Format | None"
    group_size: int
    expand: bool
    master: str  # a concrete mode from master_weights.MASTER_MODES (not "auto")

    def format_of(self, key: str) -> "FP8Format | None":
        return self.m_format if key == "exp_avg" else self.v_format

    def moment_storage(self) -> tuple:
        """What decides how m and v are stored (everything but the master mode)."""
        return (self.m_format, self.v_format, self.group_size, self.expand)


def has_fp8_moments(shape: "tuple[int, ...] | torch.Size", min_quantized_numel: int) -> bool:
    """Whether a parameter of (global) ``shape`` keeps m and v in FP8: at least 2 dims and ``min_quantized_numel``
    elements (and not empty); others keep fp32 moments."""
    n = 1
    for d in shape:
        n *= d
    return len(shape) >= 2 and n >= min_quantized_numel and n > 0


def state_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.shape) if p.dim() > 0 else (1,)


def init_moment(key: str, shape: tuple, layout: StateLayout, device) -> dict:
    """Zero-valued tensors of moment ``key`` (its codes and side tensors) for a state of ``shape``."""
    fmt = layout.format_of(key)
    if fmt is None:
        return {key: torch.zeros(shape, dtype=torch.float32, device=device)}
    side = side_shape(shape, layout.group_size)
    out = {key: torch.zeros(shape, dtype=fmt.dtype, device=device),
           key + "_absmax": torch.zeros(side, dtype=torch.float32, device=device)}
    if layout.expand:
        out[key + "_expo"] = torch.full(side, 16, dtype=torch.uint8, device=device)
    return out


def init_state(p: torch.Tensor, layout: StateLayout) -> dict:
    """Fresh state for ``p``: zero moments (they decode to exactly 0), step 0."""
    shape = state_shape(p)
    state: dict = {"step": torch.tensor(0.0, dtype=torch.float32)}
    for key in MOMENTS:
        state.update(init_moment(key, shape, layout, p.device))
    if layout.master == "bf16-remainder":
        state["master_remainder"] = torch.zeros(shape, dtype=torch.int16, device=p.device)
    return state


def read_moment(state: dict, key: str, layout: StateLayout) -> torch.Tensor:
    """Moment ``key`` of ``state`` as fp32 (the state's shape), decoded with ``layout``."""
    fmt = layout.format_of(key)
    if fmt is None:
        return state[key].float()
    return state_codec.decode(state[key], state[key + "_absmax"], state.get(key + "_expo"), fmt, layout.group_size)


def write_moment(state: dict, key: str, value: torch.Tensor, layout: StateLayout) -> None:
    """Store fp32 ``value`` (the state's shape) into moment ``key`` of ``state``, encoded with ``layout``."""
    fmt = layout.format_of(key)
    if fmt is None:
        state[key].copy_(value)
        return
    q, absmax, expo = state_codec.encode(value, fmt, layout.group_size, layout.expand)
    state[key].copy_(q)
    state[key + "_absmax"].copy_(absmax)
    if expo is not None:
        state[key + "_expo"].copy_(expo)


def state_nbytes(state: dict, include_master: bool = True) -> int:
    """Bytes held by the device tensors of one parameter's state (``step`` excluded)."""
    total = 0
    for key, value in state.items():
        if key == "step" or not isinstance(value, torch.Tensor):
            continue
        if key == "master_remainder" and not include_master:
            continue
        total += value.numel() * value.element_size()
    return total
