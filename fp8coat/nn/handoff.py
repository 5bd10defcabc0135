"""The hand-off of an FP8 norm's saved input to the linears reading the norm's output.

An FP8 RMSNorm keeps the FP8 per-group copy of its input (and ``rstd``) for its own backward. The linears reading
its output can rebuild their input from exactly those tensors in backward instead of saving an FP8 copy of their
own (:class:`fp8coat.ops.recompute.Recompute`), and take their input's per-tensor scale from the amax the norm
computed while writing its output instead of reading the output once more. ``fp8coat.convert`` links such a pair
with one :class:`Handoff` held by both ends — the norm (producer) and the module computing the linears (consumer:
the q/k/v :class:`~fp8coat.nn.linear.InputShare` or a gated MLP): the norm's forward :meth:`~Handoff.offer` s its
output with the ``Recompute`` and the amax; the consumer's forward :meth:`~Handoff.take` s them if it was called
with that very output, not modified in place since. Neither end sets attributes of the other, the offer lives from
the norm's call to the consumer's call within one forward, and ``describe_handoffs(model)`` lists every link.

Under ``torch.compile`` the offer is written and read inside one traced layer (dynamo resolves the tensor
identity while tracing and needs no guard on it); in-place changes of the offered tensor are then seen by
dynamo's own tracing rather than by its version counter.
"""

from __future__ import annotations

import torch

__all__ = ["Handoff", "describe_handoffs", "version", "unchanged"]


def version(x: torch.Tensor) -> int:
    """``x._version`` in eager mode; 0 under ``torch.compile`` (whose tracing sees in-place changes itself)."""
    return 0 if torch.compiler.is_compiling() else x._version


def unchanged(x: torch.Tensor, since: int) -> bool:
    """Whether ``x`` was not modified in place since its version was ``since`` (always true when compiling)."""
    return torch.compiler.is_compiling() or x._version == since


class Handoff:
    """One producer → consumer link; ``producer`` / ``consumer``: their names in the block, for descriptions."""

    def __init__(self, producer: str, consumer: str):
        self.producer, self.consumer = producer, consumer
        self._offer = None  # (tensor, its version, Recompute, amax) from the producer's current call

    def offer(self, y: torch.Tensor, recompute, amax: torch.Tensor) -> None:
        """Producer side: ``y`` (the norm's output) can be rebuilt in backward by ``recompute``; ``amax`` is its
        0-d fp32 max |y| (NaN as +inf)."""
        self._offer = (y, version(y), recompute, amax)

    def take(self, x: torch.Tensor):
        """Consumer side: ``(recompute, amax)`` as offered if ``x`` is the offered tensor, unchanged since; else
        ``(None, None)``. The offer is consumed either way."""
        offer, self._offer = self._offer, None
        if offer is not None and offer[0] is x and unchanged(x, offer[1]):
            return offer[2], offer[3]
        return None, None

    def __getstate__(self) -> dict:
        return {"producer": self.producer, "consumer": self.consumer}  # an offer belongs to one forward

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["producer"], state["consumer"])

    def __repr__(self) -> str:
        return f"Handoff({self.producer} -> {self.consumer})"


def describe_handoffs(model: torch.nn.Module) -> "list[str]":
    """``"<block>: <producer> -> <consumer>"`` for every hand-off in ``model`` (one line per link)."""
    lines = []
    for name, module in model.named_modules():
        handoff = getattr(module, "_fp8coat_handoff", None)
        if isinstance(handoff, Handoff) and name.endswith(handoff.producer):
            block = name[: -len(handoff.producer)].rstrip(".")
            lines.append(f"{block}: {handoff.producer} -> {handoff.consumer}")
    return lines
