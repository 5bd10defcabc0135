"""Tiny HF vision-language models and their inputs, built from configs (no downloads, no processors).

Families and the inputs each model's forward expects (transformers 5.x):

* ``llava-clip``, ``llava-siglip``, ``llava-clip-qwen2``: ``LlavaForConditionalGeneration`` with a CLIP or SigLIP
  vision tower (hidden 64, 2 layers, 4 heads, MLP 128; 32×32 images, patch 8: 16 patches, CLIP adds a class
  token), the Linear-GELU-Linear projector and a Llama (or Qwen2) LM (hidden 64, 2 layers, MLP 176).
  ``pixel_values``: (B, 3, 32, 32) float; ``input_ids``: (B, S) with ``IMAGES_PER_LLAVA = 16`` image tokens
  (``config.image_token_id``) per sample, one image per sample. CLIP feeds layer -2's patches (class token
  dropped), SigLIP all patches of layer -2 (``vision_feature_select_strategy="full"``).
* ``qwen2-vl``, ``qwen2.5-vl``: ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
  (vision: embed 64, 2 blocks, 4 heads, patch 8, temporal patch 2, spatial merge 2; LM as above with M-RoPE
  sections (2, 3, 3) of its head_dim 16). ``pixel_values``: (B·16, 3·2·8·8) flattened patches of B 32×32
  images; ``image_grid_thw``: (B, 3) rows (1, 4, 4); ``input_ids`` hold ``vision_start``, 4 image tokens (16
  patches merged 2×2) and ``vision_end`` per image; ``mm_token_type_ids`` (B, S) int: 1 at image tokens, else 0.
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llava-clip", "llava-siglip", "llava-clip-qwen2", "qwen2-vl", "qwen2.5-vl")
VOCAB = 128
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123  # ids the random text never uses
TEXT_VOCAB = 120  # random text ids are drawn from [0, TEXT_VOCAB)
IMAGE_SIZE, PATCH = 32, 8
IMAGES_PER_LLAVA = (IMAGE_SIZE // PATCH) ** 2  # 16 patches -> 16 image tokens
MERGED_PER_QWEN = IMAGES_PER_LLAVA // 4  # 2×2 spatial merge -> 4 image tokens


def _text_kwargs(**overrides) -> dict:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return kw


def _vision_tower_kwargs() -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH)


def _qwen_vl_config(config_cls, vision: dict):
    """A Qwen2-VL-family config (``config_cls``) with vision settings ``vision`` and the tiny Qwen2 LM (M-RoPE)."""
    text = _text_kwargs(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    return config_cls(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                      vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 model of ``family`` (see :data:`FAMILIES`), initialized from ``seed``, SDPA attention."""
    if family.startswith("llava"):
        if family == "llava-siglip":
            vision = transformers.SiglipVisionConfig(**_vision_tower_kwargs(), vision_use_head=False)
            strategy = "full"
        else:
            vision = transformers.CLIPVisionConfig(**_vision_tower_kwargs())  # hidden_act quick_gelu
            strategy = "default"
        text = (transformers.Qwen2Config if family == "llava-clip-qwen2" else transformers.LlamaConfig)(
            **_text_kwargs())
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                       image_seq_length=IMAGES_PER_LLAVA, vision_feature_layer=-2,
                                       vision_feature_select_strategy=strategy)
        cls = transformers.LlavaForConditionalGeneration
    elif family == "qwen2-vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                      temporal_patch_size=2, spatial_merge_size=2)  # hidden_act quick_gelu, LayerNorm
        cfg = _qwen_vl_config(transformers.Qwen2VLConfig, vision)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2.5-vl":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=64, num_heads=4,
                      patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                      fullatt_block_indexes=[1])  # hidden_act silu (gated MLP), RMSNorm
        cfg = _qwen_vl_config(transformers.Qwen2_5_VLConfig, vision)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cfg._attn_implementation = "sdpa"
    for sub in ("vision_config", "text_config"):
        getattr(cfg, sub)._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(cfg)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder: ``model.model.vision_tower`` (LLaVA) or ``model.model.visual`` (Qwen-VL; it holds the
    patch merger too)."""
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def projector(model: torch.nn.Module) -> torch.nn.Module:
    """LLaVA's ``multi_modal_projector`` or Qwen-VL's patch ``merger``."""
    inner = model.model
    return inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else inner.visual.merger


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.language_model


def inputs(family: str, seed: int = 0, batch: int = 2, text: int = 12, dtype=torch.float32) -> dict:
    """Keyword inputs of one training forward: ``batch`` samples of [image tokens, ``text`` random text tokens],
    ``labels`` = ``input_ids`` with the image (and vision start/end) positions set to -100."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, TEXT_VOCAB, (batch, text), generator=g)
    if family.startswith("llava"):
        image = torch.full((batch, IMAGES_PER_LLAVA), IMAGE_TOKEN)
        ids = torch.cat([image, words], dim=1)
        pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
        labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
        return dict(input_ids=ids, pixel_values=pixels, labels=labels)
    image = torch.cat([torch.full((batch, 1), VISION_START), torch.full((batch, MERGED_PER_QWEN), IMAGE_TOKEN),
                       torch.full((batch, 1), VISION_END)], dim=1)
    ids = torch.cat([image, words], dim=1)
    patches = batch * IMAGES_PER_LLAVA
    pixels = torch.randn(patches, 3 * 2 * PATCH * PATCH, generator=g).to(dtype)
    grid = torch.tensor([[1, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH]] * batch)
    token_types = (ids == IMAGE_TOKEN).int()
    labels = ids.masked_fill(ids >= IMAGE_TOKEN, -100)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=token_types,
                labels=labels)
