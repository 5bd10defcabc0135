"""``torch.compile`` for a model's decoder layers, one layer at a time, each with code of its own.

Compiling layer by layer keeps every graph small and quick to build and lets graph breaks stay inside one layer.
The usual way, ``layer.compile()`` on each layer, makes all layers variants of the same compiled code object
(the layer class's ``forward``: dynamo skips ``torch.nn`` frames and starts there), and dynamo keeps the variants
of one code object in one
list whose guards it tries in turn on every call. Plain layers share one variant, but fp8coat's converted layers
carry per-layer state that dynamo guards (each weight cache's handle, the objects through which q/k/v and gate/up
share one quantized input), so each layer is a variant of its own and a call walks past up to ``2 × layers``
failing guard sets (training and evaluation variants): time quadratic in depth. Measured on the CPU with the
tiny test model: compiled steps cost 0.14 ms more per layer than eager at 4 layers, 0.63 ms at 16, 1.36 ms at 32
(with :func:`compile_layers`: 0.39 ms at 16, 0.33 ms at 32); on the H200 a 16-layer, 0.9B-parameter model ran at
32.8k tok/s compiled against 42.5k eager.

:func:`compile_layers` does what ``Module.compile`` does (a compiled module-call function on the instance,
which ``Module.__call__`` uses), but the compiled function is a small caller of ``layer._call_impl`` whose code
object is copied for each layer: each layer's variants sit in a list of their own (one for training, one for
evaluation), whatever the depth. Module names, parameters and ``state_dict`` keys are unchanged.
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


def _private_call(layer: torch.nn.Module):
    """A function calling ``layer._call_impl`` (what ``Module.compile`` compiles), with a code object of its own.

    Dynamo does not trace frames of ``torch.nn`` files (it starts at the next frame, the class's shared
    ``forward``), so the copy must be of a function defined here, not of ``Module._call_impl`` itself."""

    def call_layer(*args, **kwargs):
        return layer._call_impl(*args, **kwargs)

    code = call_layer.__code__
    return types.FunctionType(code.replace(), call_layer.__globals__, code.co_name, None, call_layer.__closure__)


def compile_layers(layers, **compile_kwargs) -> int:
    """Compile each module of ``layers`` (an iterable of modules, e.g. :func:`decoder_layers`) in place, as
    ``Module.compile`` does, but with compiled code of its own per layer; ``compile_kwargs`` go to
    ``torch.compile``. Returns the number of layers compiled.

    As with ``Module.compile``: the layer's own ``forward`` (whatever it is at call time: an instance attribute
    set by another library, a class swapped in later), its hooks and its ``state_dict`` are unchanged, and a
    ``deepcopy`` or pickle of the model holds uncompiled layers. A graph break inside a layer makes dynamo compile
    the code after it (shared by all layers) once per layer, so dynamo's limit of variants per code object is
    raised to cover two per layer (training, evaluation)."""
    layers = list(layers)
    _raise_limits(2 * len(layers) + 8)
    for layer in layers:
        layer._compiled_call_impl = torch.compile(_private_call(layer), **compile_kwargs)
    return len(layers)


def is_compiled(layer: torch.nn.Module) -> bool:
    """Whether :func:`compile_layers` (or ``Module.compile``) compiled ``layer``."""
    return getattr(layer, "_compiled_call_impl", None) is not None


def _raise_limits(n: int) -> None:
    """At least ``n`` compiled variants per code object and in total (``torch._dynamo.config.recompile_limit`` and
    ``accumulated_recompile_limit``, named ``cache_size_limit`` / ``accumulated_cache_size_limit`` before torch
    2.6)."""
    import torch._dynamo.config as dynamo_config

    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((x for x in names if hasattr(dynamo_config, x)), None)
        if name is not None and getattr(dynamo_config, name) < n:
            setattr(dynamo_config, name, n)
