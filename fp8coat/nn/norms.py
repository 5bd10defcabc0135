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


class _FP8NormMixin:
    """The training forward of the FP8 norms: the norm op (its backward keeps the input as FP8) and, when linked to
    a consumer by a :class:`~fp8coat.nn.handoff.Handoff`, the offer of the tensors that op saved, from which the
    consumer's linears rebuild their input in backward and save nothing of their own. ``_recompute_kind`` names
    how; ``_norm_with_saved(x, group)`` returns ``(y, those tensors, amax of y)``."""

    _fp8coat_recipe: Recipe
    _fp8coat_handoff: "Handoff | None" = None
    _recompute_kind: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from ..ops.linear import Recompute

        group = self._fp8coat_recipe.activation_group_size
        y, saved, y_amax = self._norm_with_saved(x, group)
        if self._fp8coat_handoff is not None and torch.is_grad_enabled():
            self._fp8coat_handoff.offer(y, Recompute(self._recompute_kind, saved, group), y_amax)
        return y

    def extra_repr(self) -> str:
        link = f", hands its FP8 input to {self._fp8coat_handoff.consumer}" if self._fp8coat_handoff else ""
        return f"{super().extra_repr()}, fp8=1x{self._fp8coat_recipe.activation_group_size}{link}"


class FP8RMSNormMixin(_FP8NormMixin):
    """Linked to a consumer (the q/k/v group or the gated MLP reading this norm's output), the norm offers its
    saved FP8 input, rstd and weight."""

    _recompute_kind = "rmsnorm"

    def _norm_with_saved(self, x: torch.Tensor, group: int):
        from ..ops.norms import rmsnorm_with_saved

        y, x_q, x_s, rstd, y_amax = rmsnorm_with_saved(x, self.weight, _eps(self), group)
        return y, (x_q, x_s, rstd, self.weight), y_amax


class FP8LayerNormMixin(_FP8NormMixin):
    """Linked to a consumer (the q/k/v group or the first MLP linear reading this norm's output, in vision encoder
    blocks), the norm offers its saved FP8 centered input, rstd, weight and bias. Only norms with both a weight and a
    bias are linked (``convert``)."""

    _recompute_kind = "layernorm"

    def _norm_with_saved(self, x: torch.Tensor, group: int):
        from ..ops.norms import layernorm_with_saved

        y, x_q, x_s, rstd, y_amax = layernorm_with_saved(x, self.weight, self.bias, _eps(self), group)
        return y, (x_q, x_s, rstd, self.weight, self.bias), y_amax
