"""Memory accounting: bytes saved for backward (exact, CPU or GPU), optimizer state bytes, and the analytic planner
(:func:`plan_memory`) that predicts them, with the rest of a training step's memory, from a model's config."""

from .layer_saved import layer_saved_bytes, rest_saved_bytes
from .model_shape import ModelShape, ParamSpec
from .optimizer import optimizer_state_bytes
from .plan import MemoryPlan, PlanSettings, max_batch, plan_memory
from .saved import SavedTensors, measure_saved_tensors

__all__ = ["MemoryPlan", "ModelShape", "ParamSpec", "PlanSettings", "SavedTensors", "layer_saved_bytes",
           "max_batch", "measure_saved_tensors", "optimizer_state_bytes", "plan_memory", "rest_saved_bytes"]
