"""FP8 linear modules: ``nn.Linear`` (and HF ``Conv1D``) computing through :func:`fp8coat.ops.linear.linears`.

Sibling projections that read the same input (q/k/v, gate/up) share an :class:`InputShare`: the first one
called quantizes the input once and runs all GEMMs; the others pick up their outputs. The shared input is saved
for backward once (one FP8 transposed copy instead of three) — or not at all: when the input is the output of an
FP8 norm that offered its saved tensors (``_fp8coat_offer``), backward rebuilds it from them.
"""

from __future__ import annotations

import torch

from ..ops.linear import linears
from ..ops.weight_cache import FP8WeightCache
from ..recipe import Recipe
from .hooks import runs_code_before_forward

__all__ = ["FP8LinearMixin", "InputShare", "fp8_linear_kwargs", "make_offer", "take_offer"]


def fp8_linear_kwargs(recipe: Recipe) -> dict:
    return dict(fast_accum=recipe.fast_accum, emulate=recipe.emulate, fwd_format=recipe.forward_format,
                bwd_format=recipe.backward_format)


def _weight_nk(module) -> torch.Tensor:
    """The weight as (out_features, in_features): nn.Linear stores it so; HF Conv1D stores (in, out)."""
    if getattr(module, "_fp8coat_transposed", False):
        return module.weight.t()
    return module.weight


class InputShare:
    """Runs a group of sibling FP8 linears (same input) as one quantization + several GEMMs.

    The first member's call computes every member's output; each other member's call then returns its own, if it
    comes with the same input tensor, unchanged since. Where a member other than the first has forward pre-hooks
    or backward hooks (which must run before its weight is read), each member computes alone.
    """

    def __init__(self, members: "list[torch.nn.Module]"):
        self.members = members
        self._x = None
        self._x_version = None
        self._outputs: dict[int, torch.Tensor] = {}
        self._fp8coat_offer = None  # (tensor, its version, Recompute) set by the FP8 norm producing the input

    def __getstate__(self) -> dict:
        return {"members": self.members}  # outputs and offers in flight belong to one forward, not to copies

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._x is x and x._version == self._x_version and id(module) in self._outputs:
            out = self._outputs.pop(id(module))
            if not self._outputs:
                self._x = None
            return out
        self._outputs.clear()
        self._x = None
        if module is not self.members[0] or any(map(runs_code_before_forward, self.members[1:])):
            take_offer(self, x)  # computed alone: the producer's offer is not used
            return _single(module, x)
        recipe = module._fp8coat_recipe
        outs = linears(
            x, [_weight_nk(m) for m in self.members], [m.bias for m in self.members],
            [m._fp8coat_cache for m in self.members], recompute=take_offer(self, x), **fp8_linear_kwargs(recipe),
        )
        self._x, self._x_version = x, x._version
        self._outputs = {id(m): o for m, o in zip(self.members[1:], outs[1:])}
        return outs[0]


def make_offer(y: torch.Tensor, recompute) -> tuple:
    """What an FP8 norm hands the consumer of its output ``y``: ``y``, its version now, and the :class:`Recompute`
    rebuilding ``y`` from the norm's saved FP8 tensors."""
    return (y, y._version, recompute)


def take_offer(consumer, x: torch.Tensor):
    """The producer's :class:`Recompute` if ``x`` is the tensor it offered and was not modified in place since
    (then backward may rebuild ``x`` from the producer's saved tensors); the offer is consumed either way."""
    offer = consumer._fp8coat_offer
    consumer._fp8coat_offer = None
    if offer is not None and offer[0] is x and x._version == offer[1]:
        return offer[2]
    return None


def _single(module, x: torch.Tensor) -> torch.Tensor:
    return linears(x, [_weight_nk(module)], [module.bias], [module._fp8coat_cache],
                   **fp8_linear_kwargs(module._fp8coat_recipe))[0]


class FP8LinearMixin:
    """Forward of a converted linear layer: FP8 in training mode, the original forward in eval mode."""

    _fp8coat_recipe: Recipe
    _fp8coat_cache: FP8WeightCache
    _fp8coat_share: "InputShare | None" = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if self._fp8coat_share is not None:
            return self._fp8coat_share.forward(self, x)
        return _single(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self._fp8coat_recipe.forward_format}/{self._fp8coat_recipe.backward_format}"
