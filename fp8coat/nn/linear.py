"""FP8 linear modules: ``nn.Linear`` (and HF ``Conv1D``) computing through :func:`fp8coat.ops.linear.linears`.

Sibling projections that read the same input (q/k/v, gate/up) share an :class:`InputShare`: the first one
called quantizes the input once and runs all GEMMs; the others pick up their outputs. The shared input is saved
for backward once (one FP8 transposed copy instead of three) — or not at all: when the input is the output of an
FP8 norm linked to the group by a :class:`~fp8coat.nn.handoff.Handoff`, backward rebuilds it from the norm's
saved tensors.

By default each converted linear quantizes its weight in every forward and holds nothing of it from forward to
backward. With ``Recipe.cache_fp8_weights=True`` it keeps its weight's FP8 copy in an
:class:`~fp8coat.ops.weight_cache.FP8WeightCache` between optimizer steps (one quantization per step, however many
micro-batches; 1 byte per weight held for the whole run) — except where FSDP manages the weight
(``fully_shard``, or FSDP1 with ``use_orig_params``: both mark the modules they manage). There the weight exists in
full only while FSDP has gathered it, and a cache would keep a full FP8 copy of every sharded weight on every rank:
1 byte per parameter of the whole model, as much as the bf16 shards on 2 ranks or the fp32 shards on 4, and more
on more ranks. Such weights are quantized afresh in each forward (one more read of the gathered weight and the FP8
write, next to FSDP's all-gather of it), and a copy cached before the model was sharded is released.
"""

from __future__ import annotations

import torch

from ..ops.linear import linears
from ..ops.weight_cache import FP8WeightCache
from ..recipe import Recipe
from .handoff import Handoff, unchanged, version
from .hooks import runs_code_before_forward

__all__ = ["FP8LinearMixin", "InputShare", "fp8_linear_kwargs", "weight_cache"]


def fp8_linear_kwargs(recipe: Recipe) -> dict:
    return dict(fast_accum=recipe.fast_accum, emulate=recipe.emulate, fwd_format=recipe.forward_format,
                bwd_format=recipe.backward_format)


def weight_cache(module) -> "FP8WeightCache | None":
    """The FP8 weight cache for ``module``'s forward: its own, or None where its recipe does not cache
    (``Recipe.cache_fp8_weights``) or FSDP manages its weight (the module carries FSDP's ``_is_fsdp_managed_module``
    mark): the weight is then quantized in each forward and a copy cached earlier is freed."""
    cache = module._fp8coat_cache
    if not module._fp8coat_recipe.cache_fp8_weights or getattr(module, "_is_fsdp_managed_module", False):
        if cache.q is not None and not torch.compiler.is_compiling():
            cache.release()
        return None
    return cache


def _weight_nk(module) -> torch.Tensor:
    """The weight as (out_features, in_features): nn.Linear stores it so; HF Conv1D stores (in, out)."""
    if getattr(module, "_fp8coat_transposed", False):
        return module.weight.t()
    return module.weight


class InputShare:
    """Runs a group of sibling FP8 linears (same input) as one quantization + several GEMMs (or one linear: a
    group of one holds the hand-off from the norm producing its input, e.g. Qwen2.5-VL's fused ``attn.qkv``).

    ``members``: the modules in order; each knows its position as ``_fp8coat_slot``. The first member's call
    computes every member's output and leaves the others' in ``outputs`` (by slot) together with the input; each
    other member's call then returns its own, if it comes with the same input tensor, unchanged since. Where a member
    other than the first runs code before its forward (hooks, a ``forward`` on the instance: they may change its
    weight or input), each member computes alone.
    """

    def __init__(self, members: "list[torch.nn.Module]"):
        self.members = members
        self.x = None  # the input of the last group call, while members' outputs wait in ``outputs``
        self.x_version = 0
        self.outputs: "list[torch.Tensor | None]" = [None] * len(members)
        self.handoff: "Handoff | None" = None  # from the FP8 norm producing the input, if linked

    def __getstate__(self) -> dict:
        return {"members": self.members, "handoff": self.handoff}  # outputs in flight belong to one forward

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])
        self.handoff = state["handoff"]

    def forward(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        module = self.members[slot]
        if slot > 0:
            out, held = self.outputs[slot], self.x
            self.outputs[slot] = None
            if all(o is None for o in self.outputs):
                self.x = None  # nothing waits any more: do not keep the input alive
            if out is not None and held is x and unchanged(x, self.x_version):
                return out
            return _single(module, x)
        self.x = None
        self.outputs = [None] * len(self.members)
        recompute, x_amax = self.handoff.take(x) if self.handoff is not None else (None, None)
        for m in self.members[1:]:
            if runs_code_before_forward(m):
                return _single(module, x)  # computed alone: the producer's offer is not used
        recipe = module._fp8coat_recipe
        outs = linears(
            x, [_weight_nk(m) for m in self.members], [m.bias for m in self.members],
            [weight_cache(m) for m in self.members], recompute=recompute, x_amax=x_amax, **fp8_linear_kwargs(recipe),
        )
        if len(self.members) > 1:  # the others' outputs wait for their calls, with the input they belong to
            self.x, self.x_version = x, version(x)
            self.outputs = [None, *outs[1:]]
        return outs[0]


def _single(module, x: torch.Tensor) -> torch.Tensor:
    return linears(x, [_weight_nk(module)], [module.bias], [weight_cache(module)],
                   **fp8_linear_kwargs(module._fp8coat_recipe))[0]


class FP8LinearMixin:
    """Forward of a converted linear layer: FP8 in training mode, the original forward in eval mode."""

    _fp8coat_recipe: Recipe
    _fp8coat_cache: FP8WeightCache
    _fp8coat_share: "InputShare | None" = None
    _fp8coat_slot: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if self._fp8coat_share is not None:
            return self._fp8coat_share.forward(self._fp8coat_slot, x)
        return _single(self, x)

    def extra_repr(self) -> str:
        recipe = self._fp8coat_recipe
        return f"{super().extra_repr()}, fp8={recipe.forward_format}/{recipe.backward_format}"
