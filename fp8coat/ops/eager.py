"""Running fp8coat's custom ops in eager mode without the custom-op dispatch.

Every FP8 op is a ``torch.library`` custom op (with a registered autograd formula where it is differentiable), so
that ``torch.compile`` sees one opaque node. Called eagerly, that dispatch (schema checks, the autograd wrapper,
alias checks) costs about as much host time as the op's own kernel launches. :func:`call` runs the op's
implementation directly instead — through a plain ``torch.autograd.Function`` running the same ``setup_context``
and backward for differentiable ops — so the numbers are the same, and falls back to the registered op under
``torch.compile`` or when an argument is a tensor subclass (fake tensors, DTensor).

Arguments may be tensors, lists of tensors (one level) or plain values. Gradients of outputs that do not reach
the loss arrive as None (``set_materialize_grads(False)``): no zero tensors are allocated for the FP8 tensors the
ops return for backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["register_eager", "call"]

_IMPLS: "dict[object, tuple[Callable, Callable | None, Callable | None]]" = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def register_eager(op, impl: Callable, setup_context: "Callable | None" = None,
                   backward: "Callable | None" = None) -> None:
    """Let :func:`call` run ``op`` eagerly as ``impl`` (+ ``setup_context`` and ``backward``: the functions
    registered with ``torch.library.register_autograd`` for it, with the backward calling the plain
    implementation of the backward op). Without ``backward`` the op is not differentiable and ``impl`` is called
    as it is."""
    _IMPLS[op] = (impl, setup_context, backward)


_TENSOR = -1  # spec entry of a tensor argument; n >= 0: a list of n tensors; a tuple (value,): anything else


def _split(args: tuple):
    """``(tensors, spec)``: the tensor arguments (lists of tensors spliced in) and how to rebuild the arguments;
    None when a tensor is not a plain tensor (the registered op must dispatch it)."""
    tensors, spec = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return None
            tensors.append(a)
            spec.append(_TENSOR)
        elif type(a) is list and a and isinstance(a[0], torch.Tensor):
            for t in a:
                if type(t) not in _PLAIN:
                    return None
            tensors.extend(a)
            spec.append(len(a))
        else:
            spec.append((a,))
    return tensors, spec


def _join(tensors, spec) -> list:
    args, i = [], 0
    for entry in spec:
        if entry == _TENSOR:
            args.append(tensors[i])
            i += 1
        elif type(entry) is int:
            args.append(list(tensors[i : i + entry]))
            i += entry
        else:
            args.append(entry[0])
    return args


class _EagerOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, spec, *tensors):
        impl, setup_context, backward = _IMPLS[op]
        args = _join(tensors, spec)
        out = impl(*args)
        ctx.set_materialize_grads(False)
        setup_context(ctx, args, out)
        ctx.eager_backward, ctx.eager_spec = backward, spec
        return tuple(out) if isinstance(out, (tuple, list)) else out

    @staticmethod
    def backward(ctx, *grads):
        res = ctx.eager_backward(ctx, *grads)
        res = res if isinstance(res, tuple) else (res,)
        flat = []
        for g, entry in zip(res, ctx.eager_spec):
            if entry == _TENSOR:
                flat.append(g)
            elif type(entry) is int:
                flat.extend(g if g is not None else [None] * entry)
        return (None, None, *flat)


def call(op, *args):
    """``op(*args)``: directly (or through :class:`_EagerOp` for differentiable ops) when registered with
    :func:`register_eager`, not compiling and every tensor argument is a plain tensor; else the registered op."""
    entry = _IMPLS.get(op)
    if entry is None or torch.compiler.is_compiling():
        return op(*args)
    split = _split(args)
    if split is None:
        return op(*args)
    if entry[2] is None:
        return entry[0](*args)
    return _EagerOp.apply(op, split[1], *split[0])
