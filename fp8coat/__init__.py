"""fp8coat: memory-efficient FP8 training (COAT: FP8 optimizer states with dynamic range expansion,
FP8 activations with mixed granularity).

    model = fp8coat.convert(model, "coat")            # FP8 linears + FP8-saved activations, same parameter names
    opt = fp8coat.AdamW(model.parameters(), lr=3e-4)  # FP8 optimizer states with dynamic range expansion
    fp8coat.compile_layers(model.model.layers)        # optional: torch.compile each decoder layer
    fp8coat.save_sharded(model, opt, path)            # distributed checkpoint (any number of ranks on load)
"""

from .checkpointing import load_sharded, save_sharded
from .compiling import compile_layers
from .conversion import conversion_summary, convert, unconvert
from .formats import E4M3, E5M2, FP8Format, get_format
from .nn.fp8_all_gather import enable_fp8_all_gather, fp8_all_gather_parameters, precompute_fp8_scales
from .optim import AdamW, StepInBackward
from .recipe import RECIPES, Recipe, get_recipe

__version__ = "0.1.0"

__all__ = [
    "AdamW", "StepInBackward", "compile_layers", "convert", "unconvert", "conversion_summary", "Recipe", "RECIPES",
    "get_recipe", "enable_fp8_all_gather", "fp8_all_gather_parameters", "precompute_fp8_scales", "save_sharded",
    "load_sharded",
    "E4M3", "E5M2", "FP8Format", "get_format", "__version__",
]
