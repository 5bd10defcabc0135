"""``torch.compile`` for a model's decoder layers: each layer compiled in place, all sharing one compiled code.

Compiling layer by layer keeps every graph small and lets graph breaks stay inside one layer. ``layer.compile()``
on each layer makes them all callers of one compiled code object (the layer class's ``forward``), and converted
layers pass the same guards: their weight caches and FP8 hand-offs are reached through module attributes whose
tensors are graph inputs, with nothing that differs from layer to layer. So dynamo traces and compiles one layer
(one variant for training — two with ``Recipe.cache_fp8_weights`` on: the first call allocates the FP8 weight
caches — and, when used, one for evaluation) and every other layer reuses it: the compile time of a model does not
grow with its depth.

With FSDP2, ``compile_layers`` may come before or after ``fully_shard`` of the layers: ``layer.compile()``
compiles the call of the module, which runs the hooks ``fully_shard`` registers whenever they were registered
(its all-gather before the forward, its reshard after it), so either order computes what the eager sharded model
computes, and the layers still share one compiled code (``tests/test_fsdp_model.py``).
"""

from __future__ import annotations

import torch

__all__ = ["compile_layers", "decoder_layers", "is_compiled"]


def decoder_layers(model: torch.nn.Module) -> "torch.nn.ModuleList | None":
    """The decoder layers of an HF causal LM (``model.model.layers``) or of its base model (``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def compile_layers(layers, **compile_kwargs) -> int:
    """``layer.compile(**compile_kwargs)`` for each module of ``layers`` (e.g. :func:`decoder_layers`); returns
    the number of layers compiled. Module names, parameters, hooks and ``state_dict`` keys are unchanged, and a
    ``deepcopy`` or pickle of the model holds uncompiled layers (``Module.compile``'s behaviour)."""
    n = 0
    for layer in layers:
        layer.compile(**compile_kwargs)
        n += 1
    return n


def is_compiled(layer: torch.nn.Module) -> bool:
    """Whether ``layer.compile`` (or :func:`compile_layers`) compiled ``layer``."""
    return getattr(layer, "_compiled_call_impl", None) is not None
