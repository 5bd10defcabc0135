"""Divergence checks of ``fp8coat train``.

* A 0-d device tensor records the first step whose training loss was not finite, another counts the steps whose
  gradient norm was not finite. Both are updated every step with device operations only (no host sync) and read
  where the loop syncs anyway: at log steps and before a checkpoint is written.
* :func:`first_non_finite` scans the weights and the optimizer state for NaN or inf (before a checkpoint is
  written, and after one is loaded).
"""

from __future__ import annotations

import torch

from ..optim.sharding import is_sharded, local_tensor

__all__ = ["NonFiniteError", "count_non_finite", "device_int", "first_non_finite", "track_loss", "track_streak"]


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message names the first step (or tensor) affected."""


def device_int(device: torch.device, value: int = 0) -> torch.Tensor:
    """0-d int64 tensor on ``device`` holding ``value``: for :func:`track_loss` (0 while every loss was finite,
    else the first step whose loss was not) or :func:`count_non_finite`. Read it with ``int()`` (a host sync)."""
    return torch.full((), value, dtype=torch.int64, device=device)


def track_loss(tracker: torch.Tensor, step: int, loss: torch.Tensor) -> None:
    """Record ``step`` in ``tracker`` if ``loss`` is not finite and no earlier step was recorded (no host sync)."""
    tracker.masked_fill_(~torch.isfinite(loss) & (tracker == 0), step)


def track_streak(streak: torch.Tensor, stuck: torch.Tensor, step: int, value: torch.Tensor, limit: int) -> None:
    """``streak``: the number of consecutive steps up to ``step`` whose 0-d ``value`` was NaN or inf (reset by a
    finite one). Once it reaches ``limit`` (> 0), ``stuck`` records the step where it did, unless an earlier step
    was recorded. No host sync."""
    bad = ~torch.isfinite(value)
    streak.copy_(torch.where(bad, streak + 1, torch.zeros_like(streak)))
    if limit > 0:
        stuck.masked_fill_((streak >= limit) & (stuck == 0), step)


def count_non_finite(counter: torch.Tensor, value: torch.Tensor) -> None:
    """Add 1 to ``counter`` if the 0-d tensor ``value`` is NaN or inf (no host sync)."""
    counter.add_((~torch.isfinite(value)).to(torch.int64))


def first_non_finite(model: torch.nn.Module, optimizer) -> str | None:
    """The name of the first parameter or optimizer-state tensor holding a NaN or inf, else None (one host sync).
    FP8 tensors are checked through bf16 (same NaN and inf); tensor subclasses without ``isfinite`` (torchao's
    FP8 states) count as finite."""
    named = _float_tensors(model, optimizer)
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([_all_finite(t).to(device) for _, t in named])
    group = _shard_group(model)
    if group is not None:  # sharded parameters (FSDP): every rank checks its shards, and all agree on the result
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN, group=group)
        finite = finite.bool()
    bad = (~finite).nonzero()
    return named[int(bad[0, 0])][0] if len(bad) else None


def _float_tensors(model: torch.nn.Module, optimizer) -> list[tuple[str, torch.Tensor]]:
    """``(name, local tensor)`` of the parameters and the floating optimizer states, in the parameters' order
    (the same names in the same order on every rank of a sharded model)."""
    named = [(n, local_tensor(p.detach())) for n, p in model.named_parameters()]
    for n, p in model.named_parameters():
        named += [(f"optimizer state {key!r} of {n}", local_tensor(v)) for key, v in optimizer.state.get(p, {}).items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return named


def _shard_group(model: torch.nn.Module):
    """The process group over which ``model``'s parameters are sharded (DTensors), None if they are not."""
    p = next(model.parameters(), None)
    return p.device_mesh.get_group() if p is not None and is_sharded(p) else None


_CHUNK = 1 << 24  # elements checked at a time: bounds the temporaries (a checkpoint may be saved near full memory)


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    try:
        flags = [torch.isfinite(c.to(torch.bfloat16) if c.element_size() == 1 else c).all()  # FP8: via bf16
                 for c in t.reshape(-1).split(_CHUNK)]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=t.device)
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without these operations
        return torch.ones((), dtype=torch.bool, device=t.device)
