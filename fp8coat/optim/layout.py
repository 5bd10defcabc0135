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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import FP8Format
from .state_codec import side_shape

__all__ = ["StateLayout", "MOMENTS", "init_state", "state_nbytes"]

MOMENTS = ("exp_avg", "exp_avg_sq")


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


def _state_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.shape) if p.dim() > 0 else (1,)


def init_state(p: torch.Tensor, layout: StateLayout) -> dict:
    """Fresh state for ``p``: zero moments (they decode to exactly 0), step 0."""
    shape = _state_shape(p)
    state: dict = {"step": torch.tensor(0.0, dtype=torch.float32)}
    for key in MOMENTS:
        fmt = layout.format_of(key)
        if fmt is None:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            continue
        state[key] = torch.zeros(shape, dtype=fmt.dtype, device=p.device)
        side = side_shape(shape, layout.group_size)
        state[key + "_absmax"] = torch.zeros(side, dtype=torch.float32, device=p.device)
        if layout.expand:
            state[key + "_expo"] = torch.full(side, 16, dtype=torch.uint8, device=p.device)
    if layout.master == "bf16-remainder":
        state["master_remainder"] = torch.zeros(shape, dtype=torch.int16, device=p.device)
    return state


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
