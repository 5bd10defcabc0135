"""``torch.compile`` for a model's decoder layers, one layer at a time, each with code of its own.

Compiling layer by layer keeps every graph small and quick to build and lets graph breaks stay inside one layer.
The usual way, ``layer.compile()`` on each layer, makes all layers variants of the same compiled code object
(``Module._call_impl``, the layer class's ``forward``), and dynamo keeps the variants of one code object in one
list whose guards it tries in turn on every call. Plain layers share one variant, but fp8coat's converted layers
carry per-layer state that dynamo guards (each weight cache's handle, the objects through which q/k/v and gate/up
share one quantized input), so each layer is a variant of its own and a call walks past up to ``2 × layers``
failing guard sets (training and evaluation variants): time quadratic in depth. Measured on the CPU with the
tiny test model: compiled steps cost 0.14 ms more per layer than eager at 4 layers, 0.63 ms at 16, 1.36 ms at 32;
on the H200 a 16-layer, 0.9B-parameter model ran at 32.8k tok/s compiled against 42.5k eager.

:func:`compile_layers` gives each layer a private copy of its ``forward`` function's code (the same bytecode,
globals and closure) and compiles that: each layer's variants sit in a list of their own (one for training, one
for evaluation), whatever the depth. Module names, parameters and ``state_dict`` keys are unchanged.
"""

from __future__ import annotations

import types

import torch

__all__ = ["compile_layers", "decoder_layers", "is_compiled"]


def decoder_layers(model: torch.nn.Module) -> "torch.nn.ModuleList | None":
    """The decoder layers of an HF causal LM (``model.model.layers``) or of its base model (``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def _private_forward(layer: torch.nn.Module) -> types.MethodType:
    """``layer.forward`` bound to ``layer``, as a function whose code object is a copy no other layer shares."""
    fn = type(layer).forward
    private = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    private.__kwdefaults__ = fn.__kwdefaults__
    private.__qualname__ = fn.__qualname__
    private.__dict__.update(fn.__dict__)
    return types.MethodType(private, layer)


def compile_layers(layers, **compile_kwargs) -> int:
    """Compile each module of ``layers`` (an iterable of modules, e.g. :func:`decoder_layers`) in place through
    a private copy of its forward code; ``compile_kwargs`` go to ``torch.compile``. Returns the number compiled.

    A layer's hooks still run (``Module.__call__`` is untouched: the compiled function replaces ``forward`` on
    the instance). Dynamo's limit on compiled graphs in total is raised to cover two per layer if needed."""
    layers = list(layers)
    _raise_accumulated_limit(2 * len(layers) + 64)
    for layer in layers:
        layer.forward = torch.compile(_private_forward(layer), **compile_kwargs)
    return len(layers)


def is_compiled(layer: torch.nn.Module) -> bool:
    """Whether :func:`compile_layers` (or ``Module.compile``) compiled ``layer``."""
    forward = layer.__dict__.get("forward")
    return getattr(layer, "_compiled_call_impl", None) is not None or hasattr(forward, "_torchdynamo_orig_callable")


def _raise_accumulated_limit(n: int) -> None:
    """At least ``n`` compiled graphs in total (``torch._dynamo.config.accumulated_recompile_limit``, named
    ``accumulated_cache_size_limit`` before torch 2.6)."""
    import torch._dynamo.config as dynamo_config

    name = next((x for x in ("accumulated_recompile_limit", "accumulated_cache_size_limit")
                 if hasattr(dynamo_config, x)), None)
    if name is not None and getattr(dynamo_config, name) < n:
        setattr(dynamo_config, name, n)
