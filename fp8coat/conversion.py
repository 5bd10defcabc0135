"""``fp8coat.convert(model, recipe)``: turn a model's layers into FP8 layers in place.

What changes (training mode only; ``model.eval()`` runs every original forward, unquantized):

* ``fp8-linear`` and ``coat``: every ``nn.Linear`` (and HF ``Conv1D``) inside a repeated block runs as an FP8
  GEMM saving only its FP8 input; q/k/v and gate/up projections share one quantized input.
* ``coat`` also: RMSNorm / LayerNorm inside blocks save their input in FP8 1×16; gated MLPs (Llama, Mistral,
  Qwen2, Qwen3) run SwiGLU/GeGLU as one op saving FP8 gate and up; GELU/SiLU modules save FP8 inputs.
* Untouched: embeddings, the attention core (SDPA / flash / eager, in BF16), and everything outside the
  repeated blocks — the final norm and the LM head — unless ``module_filter_fn`` selects them.

"Inside a repeated block" means: below an ``nn.ModuleList`` (HF decoder/encoder layers, GPT-2 ``h``, ViT
``layer``). Modules keep their class hierarchy (a subclass is swapped in), parameters and names, so
``state_dict`` keys, ``save_pretrained``/``from_pretrained``, optimizers and FSDP wrapping are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .nn._swap import is_swapped, restore_class, swap_class
from .nn.activations import GATED_KINDS, FP8ActivationMixin, FP8GatedMLPMixin, activation_kind
from .nn.handoff import Handoff
from .nn.linear import FP8LinearMixin, InputShare
from .nn.norms import RMSNORM_CLASS_NAMES, FP8LayerNormMixin, FP8RMSNormMixin
from .ops.linear import fp8_gemm_supported
from .ops.weight_cache import FP8WeightCache
from .recipe import Recipe, get_recipe

__all__ = ["convert", "unconvert", "conversion_summary", "weight_caches"]

SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _in_repeated_block(fqn: str, parents: "dict[str, torch.nn.Module]") -> bool:
    parts = fqn.split(".")
    for i in range(len(parts)):
        if isinstance(parents.get(".".join(parts[:i])), torch.nn.ModuleList):
            return True
    return False


def _check_devices(model: torch.nn.Module, recipe: Recipe) -> None:
    """Every CUDA device holding a parameter must have FP8 tensor cores, unless the recipe emulates the GEMMs."""
    if recipe.emulate:
        return
    for device in {p.device for p in model.parameters() if p.is_cuda}:
        if not fp8_gemm_supported(device):
            cap = torch.cuda.get_device_capability(device)
            raise ValueError(
                f"recipe {recipe.name!r} needs FP8 tensor cores (compute capability 8.9+), but {device} is "
                f"sm_{cap[0]}{cap[1]}; use recipe.with_options(emulate=True) to emulate the FP8 GEMMs"
            )


def convert(
    model: torch.nn.Module,
    recipe: "str | Recipe" = "coat",
    *,
    module_filter_fn: "Callable[[torch.nn.Module, str], bool] | None" = None,
) -> torch.nn.Module:
    """Convert ``model`` in place for FP8 training with ``recipe`` (``"bf16"``, ``"fp8-linear"``, ``"coat"`` or a
    :class:`fp8coat.Recipe`) and return it. ``module_filter_fn(module, fqn)`` decides per module (default:
    modules inside repeated blocks)."""
    recipe = get_recipe(recipe)
    if any(is_swapped(m) for m in model.modules()):
        raise ValueError("model is already converted; call fp8coat.unconvert(model) first")
    model._fp8coat_recipe = recipe
    if not recipe.fp8_linear:
        return model
    _check_devices(model, recipe)
    modules = dict(model.named_modules())
    selected = {}
    for fqn, module in modules.items():
        keep = module_filter_fn(module, fqn) if module_filter_fn is not None else _in_repeated_block(fqn, modules)
        if keep:
            selected[fqn] = module
    for module in selected.values():
        if isinstance(module, torch.nn.Linear) or _is_conv1d(module):
            swap_class(module, FP8LinearMixin, _fp8coat_recipe=recipe,
                       _fp8coat_cache=FP8WeightCache(recipe.forward_format),
                       _fp8coat_transposed=_is_conv1d(module), _fp8coat_share=None)
    for module in selected.values():
        for names in SIBLING_GROUPS:
            group = [getattr(module, n, None) for n in names]
            if all(isinstance(m, FP8LinearMixin) for m in group) and len({_in_features(m) for m in group}) == 1:
                share = InputShare(group)
                for slot, m in enumerate(group):
                    m._fp8coat_share, m._fp8coat_slot = share, slot
    if recipe.fp8_activations:
        for module in selected.values():
            if is_swapped(module):
                continue
            name = type(module).__name__
            if name in RMSNORM_CLASS_NAMES or isinstance(module, getattr(torch.nn, "RMSNorm", ())):
                swap_class(module, FP8RMSNormMixin, _fp8coat_recipe=recipe)
            elif isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) == 1:
                swap_class(module, FP8LayerNormMixin, _fp8coat_recipe=recipe)
            elif _is_gated_mlp(module):
                swap_class(module, FP8GatedMLPMixin, _fp8coat_recipe=recipe,
                           _fp8coat_kind=activation_kind(module.act_fn))
            elif activation_kind(module) is not None:
                swap_class(module, FP8ActivationMixin, _fp8coat_recipe=recipe, _fp8coat_kind=activation_kind(module))
        for module in selected.values():
            _link_norms_to_consumers(module)
    return model


def _link_norms_to_consumers(block: torch.nn.Module) -> None:
    """In a pre-norm decoder block, link each FP8 RMSNorm to the linears reading its output by a :class:`Handoff`
    (``input_layernorm`` -> the q/k/v group, ``post_attention_layernorm`` -> the gated MLP)."""
    attn = getattr(block, "self_attn", None)
    q = getattr(attn, "q_proj", None)
    share = getattr(q, "_fp8coat_share", None)
    links = [("input_layernorm", share, "self_attn.q_proj/k_proj/v_proj"), ("post_attention_layernorm",
             getattr(block, "mlp", None), "mlp")]
    for norm_name, consumer, consumer_name in links:
        norm = getattr(block, norm_name, None)
        if isinstance(norm, FP8RMSNormMixin) and isinstance(consumer, (InputShare, FP8GatedMLPMixin)):
            handoff = Handoff(norm_name, consumer_name)
            norm._fp8coat_handoff = handoff
            if isinstance(consumer, InputShare):
                consumer.handoff = handoff
            else:
                consumer._fp8coat_handoff = handoff


def _in_features(m: torch.nn.Module) -> int:
    return m.weight.shape[0] if getattr(m, "_fp8coat_transposed", False) else m.weight.shape[1]


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    return (all(isinstance(p, FP8LinearMixin) for p in parts) and act is not None
            and activation_kind(act) in GATED_KINDS)


def unconvert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert` (the modules get their original classes back)."""
    for module in model.modules():
        restore_class(module)
    if hasattr(model, "_fp8coat_recipe"):
        del model._fp8coat_recipe
    return model


def conversion_summary(model: torch.nn.Module) -> dict:
    """Counts of converted modules by kind, e.g. ``{"FP8LinearMixin": 7, "FP8RMSNormMixin": 2, ...}``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if is_swapped(module):
            kind = type(module).__mro__[1].__name__
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def weight_caches(model: torch.nn.Module) -> "list[FP8WeightCache]":
    """The FP8 weight caches of ``model``'s converted linear layers, in module order: e.g. to count their bytes
    (``cache.nbytes``), free them before evaluation (``cache.release()``) or make the next forward quantize every
    weight again (``cache.clear()``)."""
    return [m._fp8coat_cache for m in model.modules() if isinstance(m, FP8LinearMixin)]
