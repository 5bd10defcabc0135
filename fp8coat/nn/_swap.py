"""Class swapping: give an existing module an FP8 forward without touching its parameters, buffers or names.

``swap_class(module, Mixin)`` sets ``module.__class__`` to a subclass ``(Mixin, type(module))`` created once per
pair. ``state_dict`` keys, ``Parameter`` objects, hooks and FSDP wrapping are untouched; ``restore_class`` undoes it.
The subclasses are made at run time, so pickle cannot find them by name: a swapped module pickles as "the pair
(Mixin, base class) and the module's state", and unpickling makes (or finds) the same subclass again.
"""

from __future__ import annotations

import torch

__all__ = ["swap_class", "restore_class", "is_swapped"]

_CLASSES: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, base: type) -> type:
    """The subclass ``(mixin, base)``, created on first use."""
    key = (mixin, base)
    cls = _CLASSES.get(key)
    if cls is None:
        cls = type(f"{mixin.__name__}[{base.__name__}]", (mixin, base),
                   {"_fp8coat_base": base, "_fp8coat_mixin": mixin, "__reduce_ex__": _reduce_swapped})
        cls.__module__ = mixin.__module__
        _CLASSES[key] = cls
    return cls


def _reduce_swapped(module: torch.nn.Module, protocol: int):
    cls = type(module)
    return _new_swapped, (cls._fp8coat_mixin, cls._fp8coat_base), module.__getstate__()


def _new_swapped(mixin: type, base: type) -> torch.nn.Module:
    cls = swapped_class(mixin, base)
    return cls.__new__(cls)  # pickle then restores the module's state with Module.__setstate__


def swap_class(module: torch.nn.Module, mixin: type, **attrs) -> torch.nn.Module:
    base = getattr(module, "_fp8coat_base", None) or type(module)
    module.__class__ = swapped_class(mixin, base)
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def is_swapped(module: torch.nn.Module) -> bool:
    return "_fp8coat_base" in type(module).__dict__


def restore_class(module: torch.nn.Module) -> torch.nn.Module:
    if is_swapped(module):
        module.__class__ = module._fp8coat_base
        for k in [k for k in vars(module) if k.startswith("_fp8coat_")]:
            delattr(module, k)
    return module
