"""Which hooks a converted module must honour before computing on behalf of another module.

A converted q/k/v group computes all three projections in the first one's call, and the converted gated MLP
computes gate, up and down without calling those modules. That is only right when calling a module would run
nothing but its forward: a forward pre-hook may recompute the weight (``torch.nn.utils.prune``) or change the
input, a forward hook may change the output, backward hooks wrap the call, a ``forward`` set on the instance
replaces the class's. Where such hooks exist the converted
modules compute part by part, calling each module. Hooks that only observe (marked with :func:`observer`, as
``fp8coat.memory.measure_saved_tensors`` does) do not count.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _module

__all__ = ["observer", "runs_code_before_forward", "has_hooks"]


def observer(fn):
    """Mark hook ``fn`` as one that only observes (never changes inputs, outputs, weights or gradients)."""
    fn._fp8coat_observer = True
    return fn


def _acting(hooks: dict) -> bool:
    return any(not getattr(h, "_fp8coat_observer", False) for h in hooks.values()) if hooks else False


def runs_code_before_forward(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs hooks before its forward or around its backward (its own or global
    forward pre-hooks and backward hooks, observers excepted), or a ``forward`` set on the instance (wrappers
    such as accelerate's device hooks)."""
    return ("forward" in module.__dict__ or _acting(module._forward_pre_hooks) or _acting(module._backward_hooks)
            or _acting(module._backward_pre_hooks) or _acting(_module._global_forward_pre_hooks)
            or _acting(_module._global_backward_hooks) or _acting(_module._global_backward_pre_hooks))


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs any hook other than observers (forward hooks too)."""
    return (runs_code_before_forward(module) or _acting(module._forward_hooks)
            or _acting(_module._global_forward_hooks))
