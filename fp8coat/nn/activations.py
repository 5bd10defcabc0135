"""FP8-saving activation modules and the gated MLP of Llama-family models.

* Activation modules (``nn.GELU``, ``nn.SiLU`` and HF's GELU/SiLU/quick-GELU classes) save their input as E4M3
  1×G per-group and recompute the function in backward.
* The gated MLP (``down(act(gate(x)) * up(x))``) runs gate and up as one FP8 GEMM pair on a shared quantized
  input, then one fused SwiGLU/GeGLU op that saves gate and up in FP8 and recomputes ``act(gate)`` in backward
  (neither the activation output nor the product is kept), then the FP8 down projection.
"""

from __future__ import annotations

import torch

from ..recipe import Recipe
from .handoff import Handoff
from .hooks import has_hooks
from .linear import _weight_nk, fp8_linear_kwargs, weight_cache

__all__ = ["FP8ActivationMixin", "FP8GatedMLPMixin", "GATED_KINDS", "activation_kind"]

# HF activation class name -> our kind
_HF_KINDS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "SiLUActivation": "silu",
    "QuickGELUActivation": "quick_gelu",  # x · σ(1.702 · x)
}

GATED_KINDS = ("silu", "gelu", "gelu_tanh")  # the activations of the fused SwiGLU / GeGLU op


def activation_kind(module: torch.nn.Module) -> "str | None":
    """``gelu`` | ``gelu_tanh`` | ``silu`` | ``quick_gelu`` for supported activation modules, else None."""
    if isinstance(module, torch.nn.SiLU):
        return "silu"
    if isinstance(module, torch.nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    name = type(module).__name__
    if name == "GELUActivation" and getattr(module, "act", None) is not None:
        fn = module.act
        if fn is torch.nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python":
            return "gelu"
        return None
    return _HF_KINDS.get(name)


def _apply(kind: str, x: torch.Tensor, group_size: int) -> torch.Tensor:
    from ..ops import activations as A

    if kind == "silu":
        return A.silu(x, group_size=group_size)
    if kind == "quick_gelu":
        return A.quick_gelu(x, group_size=group_size)
    return A.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none", group_size=group_size)


class FP8ActivationMixin:
    _fp8coat_recipe: Recipe
    _fp8coat_kind: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return _apply(self._fp8coat_kind, x, self._fp8coat_recipe.activation_group_size)


class FP8GatedMLPMixin:
    """For modules with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` (SiLU -> SwiGLU, GELU -> GeGLU;
    other activations are not fused: such an MLP keeps its forward and its parts convert one by one).

    Saved for backward: gate and up in FP8 (by the SwiGLU op) — and nothing else: the gate/up GEMMs rebuild their
    input from the preceding FP8 norm's saved tensors (when it offered them), and the down GEMM rebuilds its input
    silu(gate)·up from the SwiGLU op's saved gate and up. The gate/up GEMMs take their input's per-tensor scale from
    the amax the norm offered with its tensors, the down GEMM from the amax the SwiGLU op computed as it wrote its
    output: no pass over either input only to find its scale. In backward, likewise, the SwiGLU op computes the
    joint amax of the gate and up gradients as it writes them and returns it as the gradient of the link the
    gate/up op returned (``linears(..., grad_amax_link=True)``), which takes their scale from it.
    When any of the parts (gate, up, down, act_fn) has hooks, the module's original forward runs instead (calling
    each part, so that every hook runs; the parts are FP8 modules themselves).
    """

    _fp8coat_recipe: Recipe
    _fp8coat_kind: str
    _fp8coat_handoff: "Handoff | None" = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        recompute, x_amax = self._fp8coat_handoff.take(x) if self._fp8coat_handoff is not None else (None, None)
        if any(has_hooks(m) for m in (self.gate_proj, self.up_proj, self.down_proj, self.act_fn)):
            return super().forward(x)  # hooks of the parts must run: the module's own forward calls each of them
        from ..ops import activations as A
        from ..ops.linear import Recompute, linears

        recipe = self._fp8coat_recipe
        g = recipe.activation_group_size
        kw = fp8_linear_kwargs(recipe)
        # with grad on, the SwiGLU op hands the joint amax of the gate and up gradients back to these GEMMs'
        # backward through `link` (its gradient); GeGLU does not
        linked = self._fp8coat_kind == "silu" and torch.is_grad_enabled()
        gate, up, *link = linears(
            x, [_weight_nk(self.gate_proj), _weight_nk(self.up_proj)], [self.gate_proj.bias, self.up_proj.bias],
            [weight_cache(self.gate_proj), weight_cache(self.up_proj)], recompute=recompute, x_amax=x_amax,
            grad_amax_link=linked, **kw,
        )
        if self._fp8coat_kind != "silu":
            approximate = "tanh" if self._fp8coat_kind == "gelu_tanh" else "none"
            return self.down_proj(A.geglu(gate, up, approximate=approximate, group_size=g))
        if not torch.is_grad_enabled():
            return self.down_proj(A.swiglu(gate, up, group_size=g))
        act, g_q, g_s, u_q, u_s, act_amax = A.swiglu_with_saved(gate, up, group_size=g, grad_amax_link=link[0])
        down = self.down_proj
        return linears(act, [_weight_nk(down)], [down.bias], [weight_cache(down)],
                       recompute=Recompute("swiglu", (g_q, g_s, u_q, u_s), g), x_amax=act_amax, **kw)[0]
