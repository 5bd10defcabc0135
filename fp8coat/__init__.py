"""fp8coat: memory-efficient FP8 training (COAT: FP8 optimizer states with dynamic range expansion,
FP8 activations with mixed granularity)."""

from .formats import E4M3, E5M2, FP8Format, get_format
from .optim import AdamW

__version__ = "0.1.0"

__all__ = ["AdamW", "E4M3", "E5M2", "FP8Format", "get_format", "__version__"]
