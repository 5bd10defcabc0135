"""Running fp8coat's custom ops in eager mode without the custom-op dispatch.

Every FP8 op is a ``torch.library`` custom op with a registered autograd formula, so that ``torch.compile`` sees
one opaque node. Called eagerly, that dispatch (schema checks, the autograd wrapper, alias checks) costs about as
much host time as the op's own kernel launches. :func:`call` runs the op's implementation, ``setup_context`` and
backward through a plain ``torch.autograd.Function`` instead — the same functions, so the same numbers — and
falls back to the registered op under ``torch.compile`` or when an argument is a tensor subclass (fake tensors,
DTensor).

Gradients of outputs that do not reach the loss arrive as None (``set_materialize_grads(False)``): no zero
tensors are allocated for the FP8 tensors the ops return for backward.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["register_eager", "call"]

_IMPLS: "dict[object, tuple[Callable, Callable, Callable]]" = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def register_eager(op, impl: Callable, setup_context: Callable, backward: Callable) -> None:
    """Let :func:`call` run ``op`` eagerly as ``impl`` + ``setup_context`` + ``backward`` (the functions registered
    with ``torch.library.register_autograd`` for it)."""
    _IMPLS[op] = (impl, setup_context, backward)


class _EagerOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, *args):
        impl, setup_context, backward = _IMPLS[op]
        out = impl(*args)
        ctx.set_materialize_grads(False)
        setup_context(ctx, args, out)
        ctx.eager_backward = backward
        return tuple(out) if isinstance(out, (tuple, list)) else out

    @staticmethod
    def backward(ctx, *grads):
        res = ctx.eager_backward(ctx, *grads)
        return (None, *(res if isinstance(res, tuple) else (res,)))


def call(op, *args):
    """``op(*args)``: eagerly through :class:`_EagerOp` when registered and every tensor argument is a plain tensor."""
    if op in _IMPLS and not torch.compiler.is_compiling() and all(
        type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor)
    ):
        return _EagerOp.apply(op, *args)
    return op(*args)
