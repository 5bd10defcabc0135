"""``fp8coat.convert(model, recipe)``: turn a model's layers into FP8 layers in place.

What changes (training mode only; ``model.eval()`` runs every original forward, unquantized):

* ``fp8-linear`` and ``coat``: every ``nn.Linear`` (and HF ``Conv1D``) inside a repeated block runs as an FP8
  GEMM saving only its FP8 input; q/k/v and gate/up projections share one quantized input.
* ``coat`` also: RMSNorm / LayerNorm inside blocks save their input in FP8 1×16; gated MLPs (Llama, Mistral,
  Qwen2, Qwen3) run SwiGLU/GeGLU as one op saving FP8 gate and up; GELU/SiLU modules save FP8 inputs.
* ``Recipe.fp8_attention`` (opt-in, with ``coat``): the attention core of HF attention modules in the blocks
  (:func:`~fp8coat.nn.attention.is_attention_module`) saves FP8 q, k, v and recomputes itself in backward. It goes
  through transformers' attention interface: the configs those modules read switch from ``"sdpa"`` to
  ``"fp8coat_sdpa"`` (:mod:`fp8coat.nn.attention`; a text and a vision config each on their own). Attention modules
  running another implementation (eager, flash, flex) stay as they are; ``conversion_summary`` counts them under
  ``"attention kept: <implementation>"``. ``unconvert`` switches the configs back.
* ``coat`` also, in attention modules with one fused q/k/v projection (:data:`FUSED_QKV_NAMES`) running SDPA: the
  attention core gets compact copies of inputs that are views into a larger output (Qwen2-VL's v, split from the
  fused output after q and k went through RoPE, would keep the whole output alive: 4 bytes per token and channel
  more), through the same attention interface as ``fp8_attention`` — same values, less memory.
* Untouched: embeddings, the attention core (SDPA / flash / eager, in BF16) unless ``fp8_attention``, and everything
  outside the repeated blocks — the final norm and the LM head — unless ``module_filter_fn`` selects them.

"Inside a repeated block" means: below an ``nn.ModuleList`` (HF decoder/encoder layers, GPT-2 ``h``, ViT
``layer``). Modules keep their class hierarchy (a subclass is swapped in), parameters and names, so
``state_dict`` keys, ``save_pretrained``/``from_pretrained``, optimizers and FSDP wrapping are unaffected.

Vision-language models (LLaVA with a CLIP / SigLIP tower, Qwen2-VL, Qwen2.5-VL) follow the same rule in both
encoders — the vision blocks and the LM's decoder layers convert, the patch / position embeddings, the LM's
embedding, final norm and head stay — with two name-based adjustments of the default selection:

* converted although outside the blocks: a norm in front of a vision encoder's blocks (:data:`ENCODER_INPUT_NORMS`,
  CLIP's ``pre_layrnorm``), which normalizes every vision token like the blocks' own norms;
* kept in high precision even inside a ``ModuleList``: the modality projector and the patch mergers
  (:data:`HIGH_PRECISION_NAMES`). They map vision features (the un-normalized residual stream of a ViT block, with
  its outlier channels, for LLaVA) onto the LM's embedding scale, are the only trained part in LLaVA's alignment
  stage, and keep < 0.5% of a 7B VLM's activation bytes, so FP8 would save little there.

Never converted, whatever the selection: ``nn.Linear`` subclasses with their own ``forward`` (it computes something
else, e.g. an MoE router) and the ``out_proj`` of ``nn.MultiheadAttention`` (SigLIP's pooling head), whose weight
the attention reads directly instead of calling the module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .nn._swap import is_swapped, restore_class, swap_class
from .nn.activations import GATED_KINDS, FP8ActivationMixin, FP8GatedMLPMixin, activation_kind
from .nn.attention import ATTENTION_NAME, FP8AttentionMixin, is_attention_module, register_attention
from .nn.handoff import Handoff
from .nn.linear import FP8LinearMixin, InputShare
from .nn.norms import RMSNORM_CLASS_NAMES, FP8LayerNormMixin, FP8RMSNormMixin
from .ops.linear import fp8_gemm_supported
from .ops.weight_cache import FP8WeightCache
from .recipe import Recipe, get_recipe

__all__ = ["convert", "unconvert", "conversion_summary", "weight_caches"]

SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# one projection computing q, k and v (Qwen2-VL / Qwen2.5-VL vision attention, Phi-3, GPT-2, GPT-NeoX)
FUSED_QKV_NAMES = ("qkv", "qkv_proj", "c_attn", "query_key_value")
# FP8 RMSNorm -> the module(s) reading its output, in a pre-norm block: (norm, consumer, sibling group or None)
NORM_CONSUMERS = (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),  # decoder layers
                  ("post_attention_layernorm", "mlp", None),
                  ("norm1", "attn", ("qkv",)),  # Qwen2-VL / Qwen2.5-VL vision blocks: fused q/k/v, then the
                  ("norm2", "mlp", None),  # gated MLP (Qwen2.5-VL) or fc1 (Qwen2-VL)
                  ("norm2", "mlp", ("fc1",)),
                  ("layer_norm1", "self_attn", ("q_proj", "k_proj", "v_proj")),  # CLIP / SigLIP vision blocks
                  ("layer_norm2", "mlp", ("fc1",)))
# module names of a VLM that stay in high precision (with all their submodules), even inside a ModuleList: the
# projector between the vision encoder and the LM (LLaVA) and the vision encoder's patch mergers (Qwen2-VL,
# Qwen2.5-VL; Qwen3-VL's deepstack_merger_list holds one per tapped block)
HIGH_PRECISION_NAMES = ("multi_modal_projector", "merger", "deepstack_merger_list")
# norms in front of a vision encoder's blocks (outside their ModuleList) that convert with the blocks
ENCODER_INPUT_NORMS = ("pre_layrnorm",)


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _in_repeated_block(fqn: str, parents: "dict[str, torch.nn.Module]") -> bool:
    parts = fqn.split(".")
    for i in range(len(parts)):
        if isinstance(parents.get(".".join(parts[:i])), torch.nn.ModuleList):
            return True
    return False


def _selected_by_default(fqn: str, modules: "dict[str, torch.nn.Module]") -> bool:
    """Inside a repeated block, or a vision encoder's input norm; never in a projector or patch merger."""
    parts = fqn.split(".")
    if any(part in HIGH_PRECISION_NAMES for part in parts):
        return False
    return _in_repeated_block(fqn, modules) or parts[-1] in ENCODER_INPUT_NORMS


def _convertible_linear(fqn: str, module: torch.nn.Module, modules: "dict[str, torch.nn.Module]") -> bool:
    """An ``nn.Linear`` computing ``x @ Wᵀ + b`` in its forward, called by its parent (or an HF ``Conv1D``)."""
    if _is_conv1d(module):
        return True
    if not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward:
        return False
    parent = modules.get(fqn.rpartition(".")[0])
    return not isinstance(parent, torch.nn.MultiheadAttention)  # it reads out_proj.weight, never calls out_proj


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
    modules inside repeated blocks and vision encoders' input norms, not projectors or patch mergers; see the
    module docstring)."""
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
        keep = module_filter_fn(module, fqn) if module_filter_fn is not None else _selected_by_default(fqn, modules)
        if keep:
            selected[fqn] = module
    for fqn, module in selected.items():
        if _convertible_linear(fqn, module, modules):
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
    if recipe.fp8_activations:
        _convert_attention(selected.values(), recipe)
    return model


def _has_fused_qkv(module: torch.nn.Module) -> bool:
    """Whether the attention module computes q, k, v with one converted projection (:data:`FUSED_QKV_NAMES`)."""
    return any(isinstance(getattr(module, name, None), FP8LinearMixin) for name in FUSED_QKV_NAMES)


def _convert_attention(selected, recipe: Recipe) -> None:
    """Swap :class:`FP8AttentionMixin` onto the selected HF attention modules whose config runs ``"sdpa"`` and point
    those configs to :data:`~fp8coat.nn.attention.ATTENTION_NAME`; mark the others with the implementation they
    keep. With ``recipe.fp8_attention`` every attention module; otherwise only those with a fused q/k/v projection
    (their SDPA gets compact inputs). The configs switch after every module was looked at (modules of one encoder
    share one config), through ``_attn_implementation_internal`` as ``PreTrainedModel.set_attn_implementation``
    itself writes it: that method applies to whole sub-models, not to the modules ``module_filter_fn`` selected."""
    configs = []
    for module in selected:
        if not is_attention_module(module) or is_swapped(module):
            continue
        if not (recipe.fp8_attention or _has_fused_qkv(module)):
            continue
        implementation = module.config._attn_implementation
        if implementation in ("sdpa", ATTENTION_NAME):
            swap_class(module, FP8AttentionMixin, _fp8coat_recipe=recipe)
            configs.append(module.config)
        else:
            module._fp8coat_attention_kept = str(implementation)
    if configs:  # (a model with no HF attention module converts without transformers)
        register_attention()
    for config in configs:
        config._attn_implementation_internal = ATTENTION_NAME  # this config only, not its sub-configs


def _link_norms_to_consumers(block: torch.nn.Module) -> None:
    """In a pre-norm block, link each FP8 RMSNorm (or LayerNorm with weight and bias) to the linears reading its
    output by a :class:`Handoff` (:data:`NORM_CONSUMERS`: ``input_layernorm`` -> the q/k/v group,
    ``post_attention_layernorm`` -> the gated MLP; in Qwen2-VL / Qwen2.5-VL vision blocks ``norm1`` -> the fused
    ``attn.qkv``, ``norm2`` -> the gated MLP or ``mlp.fc1``; in CLIP / SigLIP vision blocks ``layer_norm1`` -> the
    q/k/v group, ``layer_norm2`` -> ``mlp.fc1``). A lone linear consumer gets an :class:`InputShare` of one member to
    hold the link; a norm is linked once."""
    for norm_name, parent_name, group_names in NORM_CONSUMERS:
        norm, parent = getattr(block, norm_name, None), getattr(block, parent_name, None)
        linkable = isinstance(norm, FP8RMSNormMixin) or (
            isinstance(norm, FP8LayerNormMixin) and norm.weight is not None and norm.bias is not None)
        if not linkable or parent is None or norm._fp8coat_handoff is not None:
            continue
        if group_names is None:
            consumer, consumer_name = parent, parent_name
        else:
            first = getattr(parent, group_names[0], None)
            if not isinstance(first, FP8LinearMixin):
                continue
            if first._fp8coat_share is None and len(group_names) == 1:
                first._fp8coat_share, first._fp8coat_slot = InputShare([first]), 0
            consumer = first._fp8coat_share
            consumer_name = f"{parent_name}." + "/".join(group_names)
        if isinstance(consumer, (InputShare, FP8GatedMLPMixin)):
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
    """Undo :func:`convert` (the modules get their original classes back, the attention modules' configs their
    ``"sdpa"``)."""
    for module in model.modules():
        if isinstance(module, FP8AttentionMixin) and module.config._attn_implementation == ATTENTION_NAME:
            module.config._attn_implementation_internal = "sdpa"
        module.__dict__.pop("_fp8coat_attention_kept", None)
        restore_class(module)
    if hasattr(model, "_fp8coat_recipe"):
        del model._fp8coat_recipe
    return model


def conversion_summary(model: torch.nn.Module) -> dict:
    """Counts of converted modules by kind, e.g. ``{"FP8LinearMixin": 7, "FP8RMSNormMixin": 2, ...}``; attention
    modules ``convert`` would have converted (with ``Recipe.fp8_attention``, or with a fused q/k/v projection) but
    that run another implementation than SDPA count as ``"attention kept: <implementation>"`` (e.g.
    ``"attention kept: eager"``)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        kept = getattr(module, "_fp8coat_attention_kept", None)
        if is_swapped(module):
            kind = type(module).__mro__[1].__name__
        elif kept is not None:
            kind = f"attention kept: {kept}"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def weight_caches(model: torch.nn.Module) -> "list[FP8WeightCache]":
    """The FP8 weight caches of ``model``'s converted linear layers, in module order: e.g. to count their bytes
    (``cache.nbytes``), free them before evaluation (``cache.release()``) or make the next forward quantize every
    weight again (``cache.clear()``)."""
    return [m._fp8coat_cache for m in model.modules() if isinstance(m, FP8LinearMixin)]
