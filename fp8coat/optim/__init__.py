"""Optimizers with FP8 states."""

from .adamw import AdamW
from .layout import StateLayout

__all__ = ["AdamW", "StateLayout"]
