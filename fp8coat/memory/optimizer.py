"""Bytes held by an optimizer's state."""

from __future__ import annotations

import torch

from ..optim.sharding import is_sharded

__all__ = ["optimizer_state_bytes"]


def _inner_tensors(t: torch.Tensor) -> "list[torch.Tensor]":
    """The plain tensors holding a (possibly subclassed, e.g. torchao's FP8 state) tensor's data; of a DTensor,
    its local shard's."""
    if is_sharded(t):
        return _inner_tensors(t.to_local())
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [inner for n in names for inner in _inner_tensors(getattr(t, n))]
    return [t]


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors on their devices: every tensor of every parameter's state except the
    ``step`` counters, tensor subclasses counted by their inner tensors (DTensors: this rank's shards), tensors
    sharing memory counted once."""
    seen = set()
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key == "step" or not isinstance(value, torch.Tensor):
                continue
            for t in _inner_tensors(value):
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                if t.numel() == 0 or ident in seen:
                    continue
                seen.add(ident)
                total += t.numel() * t.element_size()
    return total
