"""The attention core of converted HF attention modules: FP8-saved inputs (``Recipe.fp8_attention``), or compact
inputs (``coat`` in attention modules with a fused q/k/v projection).

HF attention modules run their attention core through transformers' attention interface:
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)(self, q, k, v, mask, scaling=...,
dropout=..., is_causal=..., **kwargs)``. :func:`register_attention` registers one function there with HF's
``AttentionInterface.register``, :func:`fp8coat_sdpa` under :data:`ATTENTION_NAME`, and HF's SDPA mask function under
the same name with ``AttentionMaskInterface.register`` (so the masks HF builds for it are SDPA's, bit for bit).
``fp8coat.convert`` swaps :class:`FP8AttentionMixin` onto the attention modules it converts (with ``fp8_attention``
all of them; with plain ``coat`` those with a fused q/k/v projection; their forward is unchanged) and points their
configs from ``"sdpa"`` to :data:`ATTENTION_NAME`; ``unconvert`` points them back. Without ``fp8_attention`` the
SDPA call runs as it is on compact inputs (:func:`compact_views`): same values, and v split from a fused output no
longer keeps that whole output alive for backward.

:func:`fp8coat_sdpa` is HF's own ``sdpa_attention_forward``, called with the same arguments. For a module carrying
:class:`FP8AttentionMixin`, in training mode with grad enabled, the one ``F.scaled_dot_product_attention`` call that
function makes — after its own GQA (``enable_gqa`` or ``repeat_kv``), causal-flag and cropping logic, whichever
transformers version runs — goes, through a ``TorchFunctionMode`` entered around that call only, to
:func:`fp8coat.ops.attention.fp8_attention` (with ``fp8_attention``: q, k, v saved as E4M3 1×G, the attention
recomputed in backward) or to SDPA on :func:`compact_views` of its inputs (without). Under autocast
(fp32 parameters) q, k, v are cast to the autocast dtype first, as autocast casts SDPA's inputs. The SDPA call stays
plain, with a warning, when it draws dropout (a recompute would draw another mask), when its mask needs a gradient
(a learned position bias) or when q, k, v are not (B, H, S, D) with one batch. In
every other case — ``model.eval()``, ``torch.no_grad()``, modules not converted — :func:`fp8coat_sdpa` is exactly
``sdpa_attention_forward``.

Qwen2-VL / Qwen2.5-VL vision attention calls the interface once per image (its ``cu_seqlens`` chunks): each call
saves its own chunk's FP8 q, k, v. The custom name lives in the config's ``_attn_implementation``, which transformers
never writes to ``config.json``: a saved checkpoint loads without fp8coat.

Under ``torch.compile`` dynamo traces the mode (entered and left inside the layer's graph) and records the two
opaque custom ops of ``fp8coat.ops.attention``: a compiled layer stays one graph.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..recipe import Recipe

__all__ = ["ATTENTION_NAME", "FP8AttentionMixin", "compact_views", "fp8coat_sdpa", "is_attention_module",
           "register_attention"]

ATTENTION_NAME = "fp8coat_sdpa"


def is_attention_module(module: torch.nn.Module) -> bool:
    """An HF attention module calling the attention interface: its class name ends in ``Attention`` and it holds its
    model's config (``nn.MultiheadAttention`` and other attention modules without one do not qualify)."""
    return type(module).__name__.endswith("Attention") and hasattr(getattr(module, "config", None),
                                                                   "_attn_implementation")


class FP8AttentionMixin:
    """An HF attention module whose SDPA, in training, saves FP8 q, k, v (``recipe.fp8_attention``) or runs on
    compact inputs (see the module docstring); the forward is the module's own."""

    _fp8coat_recipe: Recipe

    def extra_repr(self) -> str:
        base = super().extra_repr()
        recipe = self._fp8coat_recipe
        mode = f"fp8 attention inputs=1x{recipe.activation_group_size}" if recipe.fp8_attention else \
            "compact attention inputs"
        return f"{base}{', ' if base else ''}{mode}"

    def __setstate__(self, state: dict) -> None:
        register_attention()  # an unpickled model (another process) finds the name its config holds
        super().__setstate__(state)


class _SDPAOverride(torch.overrides.TorchFunctionMode):
    """Runs the ``F.scaled_dot_product_attention`` calls made inside it as :func:`_sdpa` (``recipe.fp8_attention``:
    FP8-saved q, k, v) or :func:`_compact_sdpa` (plain SDPA on compact inputs); every other function unchanged."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if self.recipe.fp8_attention:
            return _sdpa(*args, group_size=self.recipe.activation_group_size, **kwargs)
        return _compact_sdpa(*args, **kwargs)


def compact_views(tensors: "list[torch.Tensor]") -> "list[torch.Tensor]":
    """``tensors`` with each one that views a storage holding more than the ``tensors`` viewing it replaced by a
    contiguous copy (same values): SDPA saves its inputs, and a view keeps its whole storage alive — v split from a
    fused q/k/v projection's output keeps all three parts, though q and k were replaced by RoPE's outputs. Inputs
    that fill their storage together (GPT-2's q, k, v split from one output) stay views. Under ``torch.compile``
    the tensors are returned as they are (the partitioner decides what the compiled graph saves)."""
    if torch.compiler.is_compiling():
        return list(tensors)
    viewed: dict[int, int] = {}
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        viewed[key] = viewed.get(key, 0) + t.numel() * t.element_size()
    out = []
    for t in tensors:
        storage = t.untyped_storage()
        wasteful = storage.nbytes() > viewed[storage.data_ptr()]
        out.append(t.clone(memory_format=torch.contiguous_format) if wasteful else t)
    return out


def _compact_sdpa(query, key, value, *args, **kwargs):
    query, key, value = compact_views([query, key, value])
    return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)


def _plain_reason(query, key, value, attn_mask, dropout_p) -> "str | None":
    """Why this SDPA call must run as it is (None: the FP8-saving op applies)."""
    if dropout_p != 0.0:
        return "attention dropout (a recompute in backward would draw another mask)"
    if attn_mask is not None and attn_mask.requires_grad:
        return "an attention mask that requires grad"
    if not (query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]):
        return "q, k, v not (B, H, S, D) with one batch size"
    return None


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
          group_size: int):
    from ..ops.attention import fp8_attention

    reason = _plain_reason(query, key, value, attn_mask, dropout_p)
    if reason is not None:
        warnings.warn(f"fp8coat: FP8 attention inputs skipped for this attention call ({reason}): it saves q, k, v "
                      "and its output as plain SDPA does", stacklevel=3)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # SDPA runs in the autocast dtype: cast q, k, v (and a float mask) so
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    with torch.autocast(device, enabled=False):  # the op is not autocast
        return fp8_attention(query, key, value, attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                             group_size=group_size)


def fp8coat_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs):
    """HF's ``sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)``; where ``module`` was
    converted and trains with grad enabled, its SDPA call saves FP8 q, k, v (``fp8_attention``) or runs on compact
    inputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (isinstance(module, FP8AttentionMixin) and module.training and torch.is_grad_enabled()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with _SDPAOverride(module._fp8coat_recipe):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Register :func:`fp8coat_sdpa` (and SDPA's mask function) under :data:`ATTENTION_NAME` with transformers'
    ``AttentionInterface`` / ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, fp8coat_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
