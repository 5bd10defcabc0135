"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio · lr`` at the last step.

The schedule is a function of the run's current total ``steps``: a run resumed with another ``--steps`` continues
from its step on the curve of the new total (so the learning rate jumps to that curve at the resume)."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(step: int, *, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for 0-based ``step`` of ``steps``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
