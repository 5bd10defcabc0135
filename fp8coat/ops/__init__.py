"""Autograd ops that keep their saved activations in FP8."""

from .activations import geglu, gelu, quick_gelu, silu, swiglu
from .attention import fp8_attention
from .norms import layernorm, layernorm_bwd, layernorm_fwd, rmsnorm, rmsnorm_bwd, rmsnorm_fwd

__all__ = ["swiglu", "geglu", "gelu", "quick_gelu", "silu", "fp8_attention",
           "rmsnorm", "rmsnorm_fwd", "rmsnorm_bwd", "layernorm", "layernorm_fwd", "layernorm_bwd"]
