"""FP8-saving norms: RMSNorm (HF Llama/Mistral/Qwen2/Qwen3, the Qwen2-VL / Qwen2.5-VL LM and vision blocks,
``torch.nn.RMSNorm``) and ``nn.LayerNorm``.

Training mode saves the norm's input as E4M3 1×G per-group plus fp32 statistics (``fp8coat.ops.norms``); eval
mode runs the module's original forward.
"""

from __future__ import annotations

import torch

from ..recipe import Recipe
from .handoff import Handoff

__all__ = ["FP8RMSNormMixin", "FP8LayerNormMixin", "RMSNORM_CLASS_NAMES"]

# RMSNorms computing weight · x / rms(x) (Gemma's (1 + weight) variant is deliberately absent)
RMSNORM_CLASS_NAMES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2VLRMSNorm",
                       "Qwen2_5_VLRMSNorm", "RMSNorm")


def _eps(module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return float(torch.finfo(torch.float32).eps)  # torch.nn.RMSNorm's default when eps is None


class FP8RMSNormMixin:
    """Linked to a consumer (the q/k/v group or the gated MLP reading this norm's output) by a
    :class:`~fp8coat.nn.handoff.Handoff`, the norm offers its saved FP8 input and statistics: the consumer's
    linears rebuild their input from them in backward and save nothing of their own."""

    _fp8coat_recipe: Recipe
    _fp8coat_handoff: "Handoff | None" = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from ..ops.linear import Recompute
        from ..ops.norms import rmsnorm, rmsnorm_with_saved

        group = self._fp8coat_recipe.activation_group_size
        if self._fp8coat_handoff is None or not torch.is_grad_enabled():
            return rmsnorm(x, self.weight, _eps(self), group)
        y, x_q, x_s, rstd = rmsnorm_with_saved(x, self.weight, _eps(self), group)
        self._fp8coat_handoff.offer(y, Recompute("rmsnorm", (x_q, x_s, rstd, self.weight), group))
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{_fp8_repr(self)}"


class FP8LayerNormMixin:
    """Linked to a consumer (the q/k/v group or the first MLP linear reading this norm's output, in vision
    encoder blocks) by a :class:`~fp8coat.nn.handoff.Handoff`, the norm offers its saved FP8 input, mean and rstd
    with its weight and bias: the consumer's linears rebuild their input from them in backward and save nothing
    of their own. Only norms with both a weight and a bias are linked (``convert``)."""

    _fp8coat_recipe: Recipe
    _fp8coat_handoff: "Handoff | None" = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from ..ops.linear import Recompute
        from ..ops.norms import layernorm, layernorm_with_saved

        group = self._fp8coat_recipe.activation_group_size
        if self._fp8coat_handoff is None or not torch.is_grad_enabled():
            return layernorm(x, self.weight, self.bias, _eps(self), group)
        y, x_q, x_s, mean, rstd = layernorm_with_saved(x, self.weight, self.bias, _eps(self), group)
        self._fp8coat_handoff.offer(y, Recompute("layernorm", (x_q, x_s, mean, rstd, self.weight, self.bias),
                                                 group))
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{_fp8_repr(self)}"


def _fp8_repr(norm) -> str:
    """The FP8 part of a converted norm's ``repr``: its group size and the consumer it hands its input to."""
    link = f", hands its FP8 input to {norm._fp8coat_handoff.consumer}" if norm._fp8coat_handoff else ""
    return f", fp8=1x{norm._fp8coat_recipe.activation_group_size}{link}"
