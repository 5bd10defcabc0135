"""The main job: training runs (``fp8coat train``) and recipe comparisons (``fp8coat compare``)."""

from .compare import compare, variant_config
from .config import TrainConfig
from .finite import NonFiniteError
from .loop import train
from .presets import PRESETS

__all__ = ["TrainConfig", "train", "compare", "variant_config", "PRESETS", "NonFiniteError"]
