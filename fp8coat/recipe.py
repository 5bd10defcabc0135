"""Recipes: one frozen description of what a converted model computes in FP8.

=============  ==================  =====================================  =======================================
recipe         linear GEMMs        saved for backward                     notes
=============  ==================  =====================================  =======================================
``bf16``       BF16                as the original model                  the baseline; ``convert`` changes nothing
``fp8-linear`` E4M3 × E4M3 fwd,    FP8 (E4M3, per-tensor, transposed)     TransformerEngine / torchao-like
               E5M2 grads          linear inputs; the rest as before
``coat``       as ``fp8-linear``   + FP8 (E4M3, 1×16 per-group) inputs    COAT's precision flow: norms and
                                   of norms and activation functions      activations save FP8, recompute the rest
=============  ==================  =====================================  =======================================

Opt-in on top of ``coat``: ``fp8_attention=True`` has the attention core save FP8 (E4M3, 1×G) q, k, v and recompute
itself in backward instead of keeping q, k, v and its output in BF16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .formats import get_format

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """What ``fp8coat.convert`` quantizes.

    Attributes:
        name: preset name (``bf16``, ``fp8-linear``, ``coat``) or a user label.
        fp8_linear: run linear layers as FP8 GEMMs that save only FP8 inputs.
        fp8_activations: norms and activation functions save their inputs in FP8 (per-group).
        forward_format / backward_format: FP8 formats of activations and weights / of output gradients.
        activation_group_size: G of the 1×G groups of saved non-linear inputs.
        fast_accum: Hopper fast accumulation in the forward GEMM (backward GEMMs always accumulate precisely).
        emulate: compute the FP8 GEMMs as dequantize + fp32 matmul even on CUDA (same quantization; for GPUs
            without FP8 tensor cores and for testing). Always on for CPU tensors.
        cache_fp8_weights: False (the default): each converted linear quantizes its weight in every forward and
            frees the copy after the forward's GEMM, so nothing is held from forward to backward. True: it keeps
            its weight's E4M3 copy (1 byte per parameter, for the whole run) and quantizes the weight again only
            when it changed — once per optimizer step however many micro-batches, which pays only under gradient
            accumulation. Same results, bit for bit; on a full Llama-2-7B (H100, batch 8 × 2048) both ran at the
            same speed and the copies cost 6 GiB of peak memory. Weights that FSDP manages are never cached.
        fp8_attention: False (the default): the attention core (HF's SDPA call between the q/k/v projections and
            the output projection) runs as in the original model and keeps q, k, v and its output in the model's
            dtype for backward. True (needs ``fp8_activations``): it keeps only E4M3 1×G copies of q, k and v
            (``activation_group_size``; 3.75 bytes per token and channel at G = 16 instead of 8 in bf16), and its
            backward recomputes the attention forward from the dequantized inputs — one more attention forward per
            backward — and returns the exact gradients at the quantized inputs, as the FP8 norms and activations do.
            The forward computes what plain SDPA computes, bit for bit (``fp8coat.ops.attention``,
            ``fp8coat.nn.attention``).
    """

    name: str
    fp8_linear: bool
    fp8_activations: bool
    forward_format: str = "e4m3"
    backward_format: str = "e5m2"
    activation_group_size: int = 16
    fast_accum: bool = True
    emulate: bool = False
    cache_fp8_weights: bool = False
    fp8_attention: bool = False

    def __post_init__(self):
        get_format(self.forward_format)
        get_format(self.backward_format)
        if get_format(self.forward_format).name == get_format(self.backward_format).name == "e5m2":
            raise ValueError("forward_format and backward_format cannot both be e5m2: the input-gradient GEMM "
                             "multiplies gradients by weights, and FP8 GEMMs take at most one E5M2 operand")
        if self.fp8_activations and not self.fp8_linear:
            raise ValueError("fp8_activations needs fp8_linear (the precision flow feeds FP8 GEMMs)")
        if self.fp8_attention and not self.fp8_activations:
            raise ValueError("fp8_attention needs fp8_activations (it saves the attention inputs as the FP8 norms "
                             "and activations save theirs)")

    def with_options(self, **changes) -> "Recipe":
        return replace(self, **changes)

    def __str__(self) -> str:
        if not self.fp8_linear:
            return f"{self.name} (BF16)"
        acts = f", FP8 1x{self.activation_group_size} activations" if self.fp8_activations else ""
        attn = ", FP8-saved attention inputs" if self.fp8_attention else ""
        cache = ", FP8 weight copies kept between steps" if self.cache_fp8_weights else ""
        return f"{self.name} ({self.forward_format.upper()}/{self.backward_format.upper()} GEMMs{acts}{attn}{cache})"


RECIPES = {
    "bf16": Recipe("bf16", fp8_linear=False, fp8_activations=False),
    "fp8-linear": Recipe("fp8-linear", fp8_linear=True, fp8_activations=False),
    "coat": Recipe("coat", fp8_linear=True, fp8_activations=True),
}


def get_recipe(recipe: "str | Recipe") -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe in RECIPES:
        return RECIPES[recipe]
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)} or a fp8coat.Recipe")
