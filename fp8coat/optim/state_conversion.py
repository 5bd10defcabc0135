"""Converting a parameter's optimizer state after the parameter or its group's options changed.

The optimizer records, per parameter, a :class:`StateSpec`: the layout, parameter dtype, device and group options
its state was made for. When any of them differs at a step (``model.float()``, ``model.to(device)``, a new
``group_size`` in ``opt.param_groups[i]``, a checkpoint saved for parameters of another dtype), the state is
converted before the update, or a ValueError says why it cannot be:

* device: every state tensor moves to the parameter's device (``step`` stays a CPU tensor).
* moments (formats, ``group_size``, ``expansion``, ``min_quantized_numel``): m and v are decoded with the old
  layout and encoded with the new one (one extra quantization error, as in any step).
* master weights (``master_remainder`` and the parameter): a dtype change must not lose an exact master.
  ``bf16-remainder`` -> float32 rebuilds the fp32 master from the bf16 value and the remainder and writes it into
  the parameter, wherever the parameter still holds a bf16 value (other elements were written by the user after
  the conversion and are taken as they are); the parameter then continues with the master mode its group gives
  float32 (``auto``: ``fp32``). An exact master (``fp32``, ``bf16-remainder``) moving to any other dtype has
  already been rounded away by the conversion: that raises. Modes without a master (``none``,
  ``bf16-stochastic``) move to any dtype their group's ``master_weights`` accepts. With the dtype unchanged, a
  change of ``master_weights`` itself does what it asks (e.g. ``bf16-remainder`` -> ``none`` drops the remainder,
  ``none`` -> ``bf16-remainder`` starts one at zero, i.e. the master is the bf16 value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import MOMENT_SUFFIXES, MOMENTS, StateLayout, init_moment, read_moment, write_moment
from .master_weights import join_bf16_remainder

__all__ = ["StateSpec", "master_conversion_error", "convert_state", "restore_fp32_master"]

EXACT_MASTERS = ("fp32", "bf16-remainder")


@dataclass(frozen=True)
class StateSpec:
    """What a parameter's state was made for: its ``layout``, the parameter's ``dtype`` and ``device``, and the
    group ``options`` (``layout.group_options``) the layout came from."""

    layout: StateLayout
    dtype: torch.dtype
    device: torch.device
    options: tuple


def master_conversion_error(old_mode: str, old_dtype: torch.dtype, new_dtype: torch.dtype, name: str) -> "str | None":
    """Why a state kept with master mode ``old_mode`` for ``old_dtype`` parameters cannot follow its parameter
    to ``new_dtype`` (an error message), or None when it can."""
    if new_dtype == old_dtype or old_mode not in EXACT_MASTERS:
        return None
    if old_mode == "bf16-remainder" and new_dtype == torch.float32:
        return None
    return (
        f"{name} changed dtype from {old_dtype} to {new_dtype} after fp8coat.AdamW created its state; its exact "
        f"master weights (master_weights {old_mode!r}) cannot be kept in {new_dtype}, and updating it would silently "
        f"lose precision. Convert the parameter back to {old_dtype} (float32 works too for a bf16-remainder master), "
        f"or create a new optimizer for the {new_dtype} parameters"
    )


def restore_fp32_master(p: torch.Tensor, remainder: torch.Tensor) -> None:
    """Write the exact master into float32 parameter ``p`` whose state kept a ``bf16-remainder`` master.

    ``remainder``: int16, the state's shape (``p.shape``, or ``(1,)`` for a 0-d parameter). Elements of ``p``
    holding a bf16 value (low 16 bits zero) become that value joined with their remainder; others are kept.
    """
    data = p.detach()
    flat = data.reshape(remainder.shape)
    holds_bf16 = (flat.contiguous().view(torch.int32) & 0xFFFF) == 0
    master = join_bf16_remainder(flat.to(torch.bfloat16), remainder)
    data.copy_(torch.where(holds_bf16, master, flat).reshape(data.shape))


def _move_state(state: dict, device: torch.device) -> None:
    for key, value in state.items():
        if key != "step" and isinstance(value, torch.Tensor):
            state[key] = value.to(device)


def _convert_master(p: torch.Tensor, state: dict, old: StateSpec, new_mode: str) -> None:
    """Carry the master over from ``old`` to mode ``new_mode`` for ``p``'s current dtype (checked beforehand
    with :func:`master_conversion_error`)."""
    if old.layout.master == "bf16-remainder" and old.dtype != p.dtype:  # to float32
        restore_fp32_master(p, state["master_remainder"])
    if new_mode != "bf16-remainder":
        state.pop("master_remainder", None)
    elif "master_remainder" not in state:  # from a mode without a master: the bf16 value is the master
        state["master_remainder"] = torch.zeros(state["exp_avg"].shape, dtype=torch.int16, device=p.device)


def _relayout_moments(state: dict, old: StateLayout, new: StateLayout) -> None:
    """Decode m and v with ``old`` and store them encoded with ``new``."""
    if old.moment_storage() == new.moment_storage():
        return
    shape, device = tuple(state["exp_avg"].shape), state["exp_avg"].device
    for key in MOMENTS:
        value = read_moment(state, key, old)
        for suffix in MOMENT_SUFFIXES:
            state.pop(key + suffix, None)
        state.update(init_moment(key, shape, new, device))
        write_moment(state, key, value, new)


def convert_state(p: torch.Tensor, state: dict, old: StateSpec, new: StateLayout) -> None:
    """Convert ``p``'s ``state``, made for ``old``, in place to layout ``new`` for ``p``'s current dtype and
    device (the master conversion must have been checked with :func:`master_conversion_error`)."""
    if old.device != p.device:
        _move_state(state, p.device)
    _convert_master(p, state, old, new.master)
    _relayout_moments(state, old.layout, new)
