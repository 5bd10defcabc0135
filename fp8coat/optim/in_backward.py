"""The optimizer step inside backward: each parameter is updated as soon as its gradient is complete, and the
gradient is freed right away, so the gradients of the whole model never exist at once.

With bf16 parameters, FP8 moments and the exact bf16 remainder this takes the resident training memory from
8.08 to 6.08 bytes per parameter (the 2 B/param of bf16 gradients are gone; only the gradients of the parameters
whose backward is in flight are alive). The usual loop keeps working: ``optimizer.step()`` finds no gradients and
does nothing, ``zero_grad`` has nothing to clear.

    sib = StepInBackward(optimizer)            # registers a post-accumulate-grad hook on every parameter
    for batch in data:
        set_lr(optimizer, ...)                 # the learning rate must be set before backward
        for micro in batch[:-1]:
            with sib.accumulating():           # gradient accumulation: no step, gradients add up
                loss(micro).backward()
        loss(batch[-1]).backward()             # the step happens here, parameter by parameter
    sib.remove()

Not possible in this mode: clipping by the global gradient norm (a parameter is updated before the other
gradients exist), or reading gradients after backward. Updates are bit-identical to ``optimizer.step()`` for the
fp32 and bf16-remainder master modes; with stochastic rounding each parameter draws its own random bits.

On CUDA the updates run on a side stream (``overlap=True``, the default), so they overlap with the rest of the
backward pass instead of adding to it: each update waits for the work queued so far on the backward's stream (its
gradient is complete, the last reads of the parameter are done), the gradient's memory is released to the
allocator only once the update has read it (``record_stream``), and when backward ends its stream waits for the
side stream, so the next forward sees the updated parameters (after a backward pass that raised, call
:meth:`StepInBackward.wait` before using the parameters; the next backward pass starts a new step either way).

Under FSDP2 (``fully_shard``) the optimizer holds the sharded (DTensor) parameters, which autograd never sees:
it computes the gradients of the unsharded ones. FSDP2 runs the post-accumulate-grad hooks of each sharded
parameter itself, right after it assigned (or added) the reduce-scattered gradient shard, on the stream of the
reduction — so each shard is updated as soon as its reduced gradient exists, the unsharded gradient is already
gone, and every rank updates only its own shard. Gradient accumulation works either way: with
``model.set_requires_gradient_sync(False)`` on the micro-batches before the last, FSDP2 reduces (and runs the
hooks) only in the last one; with synchronised micro-batches inside :meth:`StepInBackward.accumulating`, the
reduced shards add up until the last. FSDP2's own end-of-backward work (the root's parameters, whose gradients
are reduced there) runs before the pass ends here, so they are part of the same optimizer step.
"""

from __future__ import annotations

import contextlib

import torch

from .adamw import AdamW

__all__ = ["StepInBackward"]


def _graph_task_id() -> "int | None":
    """The id of the backward pass (autograd graph task) running this hook, None where torch does not tell."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else None


class StepInBackward:
    """Run ``optimizer``'s update for each parameter from a post-accumulate-grad hook, then drop its gradient."""

    def __init__(self, optimizer: AdamW, overlap: bool = True):
        if not isinstance(optimizer, AdamW):
            raise TypeError(f"StepInBackward needs an fp8coat.AdamW, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.overlap = overlap
        self._accumulating = False
        self._in_pass = False
        self._task: "int | None" = None  # the autograd graph task of the pass in progress
        self._side: "dict[torch.device, torch.cuda.Stream]" = {}  # one update stream per device
        self._joins: "dict[torch.device, torch.cuda.Stream]" = {}  # backward streams to join at the end of a pass
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for group in optimizer.param_groups for p in group["params"] if p.requires_grad
        ]

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._accumulating or p.grad is None:
            return
        task = _graph_task_id()
        first = not self._in_pass or task != self._task  # (a pass that raised never ran its end callback)
        if first:  # the first update of this backward pass starts a new optimizer step
            self._join()
            self._in_pass, self._task = True, task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        if self.overlap and p.is_cuda:
            main = torch.cuda.current_stream(p.device)
            side = self._side.get(p.device)
            if side is None:
                side = self._side[p.device] = torch.cuda.Stream(p.device)
            side.wait_stream(main)  # the gradient is complete and the parameter's last reads are queued before
            with torch.cuda.stream(side):
                self.optimizer.step_params([p], new_step=first)
            # its memory is reused only after the update has read it (a DTensor's: its local tensor's)
            getattr(p.grad, "_local_tensor", p.grad).record_stream(side)
            self._joins[p.device] = main
        else:
            self.optimizer.step_params([p], new_step=first)
        p.grad = None

    def _end_pass(self) -> None:
        self._in_pass = False
        self._join()

    def wait(self) -> None:
        """Make the backward streams wait for the updates in flight. Backward passes do this when they end; call it
        yourself only after a backward pass that raised, before the parameters are used again."""
        self._in_pass = False
        self._join()

    def _join(self) -> None:
        for dev, main in self._joins.items():  # the next forward must see the updated parameters
            side = self._side[dev]
            main.wait_stream(side)
            # and the stream the pass ends on (the caller's): hooks may run on another one (FSDP2's reduction)
            torch.cuda.current_stream(dev).wait_stream(side)
        self._joins.clear()

    @contextlib.contextmanager
    def accumulating(self):
        """Backward passes inside this block only accumulate gradients (the micro-batches before the last)."""
        previous, self._accumulating = self._accumulating, True
        try:
            yield self
        finally:
            self._accumulating = previous

    def remove(self) -> None:
        """Unregister the hooks; later backward passes leave gradients for ``optimizer.step()`` again."""
        for h in self._handles:
            h.remove()
        self._handles = []
