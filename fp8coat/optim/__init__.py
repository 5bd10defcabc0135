"""Optimizers with FP8 states."""

from .adamw import AdamW
from .in_backward import StepInBackward
from .layout import StateLayout

__all__ = ["AdamW", "StateLayout", "StepInBackward"]
