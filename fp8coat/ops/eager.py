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

from typing import Callable

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


def _flatten(args: tuple) -> "tuple[list, list[int]]":
    """The arguments with lists spliced in, and each argument's length (-1: not a list)."""
    leaves, sizes = [], []
    for a in args:
        if isinstance(a, list):
            leaves.extend(a)
            sizes.append(len(a))
        else:
            leaves.append(a)
            sizes.append(-1)
    return leaves, sizes


def _unflatten(leaves, sizes) -> list:
    args, i = [], 0
    for n in sizes:
        if n < 0:
            args.append(leaves[i])
            i += 1
        else:
            args.append(list(leaves[i : i + n]))
            i += n
    return args


class _EagerOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, sizes, *leaves):
        impl, setup_context, backward = _IMPLS[op]
        args = _unflatten(leaves, sizes)
        out = impl(*args)
        ctx.set_materialize_grads(False)
        setup_context(ctx, args, out)
        ctx.eager_backward, ctx.eager_sizes = backward, sizes
        return tuple(out) if isinstance(out, (tuple, list)) else out

    @staticmethod
    def backward(ctx, *grads):
        res = ctx.eager_backward(ctx, *grads)
        res = res if isinstance(res, tuple) else (res,)
        flat = []
        for g, n in zip(res, ctx.eager_sizes):
            if n < 0:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * n)
        return (None, None, *flat)


def call(op, *args):
    """``op(*args)``: directly (or through :class:`_EagerOp` for differentiable ops) when registered with
    :func:`register_eager`, not compiling and every tensor argument is a plain tensor; else the registered op."""
    entry = _IMPLS.get(op)
    if entry is not None and not torch.compiler.is_compiling():
        leaves, sizes = _flatten(args)
        if all(type(a) in _PLAIN for a in leaves if isinstance(a, torch.Tensor)):
            if entry[2] is None:
                return entry[0](*args)
            return _EagerOp.apply(op, sizes, *leaves)
    return op(*args)
