"""Memory accounting: bytes saved for backward (exact, CPU or GPU), optimizer state bytes."""

from .optimizer import optimizer_state_bytes
from .saved import SavedTensors, measure_saved_tensors

__all__ = ["SavedTensors", "measure_saved_tensors", "optimizer_state_bytes"]
