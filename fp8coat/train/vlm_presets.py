"""Vision-language model presets (LLaVA and Qwen2-VL shapes, random init) with their processors, offline.

================  ========  =====  =====  ================================  ====================================
preset            family    image  patch  vision tower                      language model
================  ========  =====  =====  ================================  ====================================
``tiny-llava``    llava     32     8      CLIP: 64 wide, 2 layers           Llama: 128 wide, 2 layers, MLP 352
``llava-100m``    llava     224    14     CLIP: 512 wide, 8 layers          Llama: 768 wide, 10 layers, MLP 2048
``tiny-qwen2vl``  qwen2-vl  32     4      ViT: 64 wide, 2 layers, merge 2   Qwen2: 128 wide, 2 layers, MLP 352
``qwen2vl-100m``  qwen2-vl  224    14     ViT: 512 wide, 8 layers, merge 2  Qwen2: 768 wide, 10 layers, MLP 2048
================  ========  =====  =====  ================================  ====================================

Image tokens per image: 16 (tiny-llava: (32/8)²), 256 (llava-100m: (224/14)²), 16 (tiny-qwen2vl: (32/4)²/2²),
64 (qwen2vl-100m: (224/14)²/2²). Parameters besides the token embeddings and the LM head: 0.54M (tiny-llava),
0.57M (tiny-qwen2vl), 97.4M (llava-100m), 94.5M (qwen2vl-100m); the embeddings add 2 × hidden per token of the
vocabulary (0.26M / 1.54M per 1000 tokens: ~104M and ~101M in all with a 4096-token vocabulary).
The tiny presets are for CPU tests; the ``-100m`` ones for a GPU.

LLaVA presets take the last vision layer's patch features (``vision_feature_layer=-1``, CLS dropped) through a
2-layer GELU projector; Qwen2-VL presets use multimodal RoPE with ``mrope_section`` = (1/4, 3/8, 3/8) of half the
head dimension, as Qwen2-VL does. Every context is 4096 positions. The token ids in the model's config
(``image_token_id``, ``pad_token_id``, ...) are those of the processor's tokenizer, and the embedding has one row
per token of it (``len(tokenizer)``).

    tokenizer = vlm_tokenizer(preset_family("tiny-llava"), record_texts(records), vocab_size=1024)  # or None: bytes
    model, processor = build_vlm("tiny-llava", tokenizer, dtype=torch.bfloat16, device="cuda", seed=0)
"""

from __future__ import annotations

import torch

from .data.vlm_tokenizer import vlm_tokenizer
from .presets import PRESET_MAX_POSITIONS

__all__ = ["VLM_PRESETS", "build_vlm", "preset_family", "vlm_config", "vlm_processor"]

VLM_PRESETS = {
    "tiny-llava": {"family": "llava", "image_size": 32, "patch_size": 8,
                   "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                              "num_attention_heads": 4},
                   "text": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                            "num_attention_heads": 4}},
    "llava-100m": {"family": "llava", "image_size": 224, "patch_size": 14,
                   "vision": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
                              "num_attention_heads": 8},
                   "text": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
                            "num_attention_heads": 12}},
    "tiny-qwen2vl": {"family": "qwen2-vl", "image_size": 32, "patch_size": 4, "merge_size": 2,
                     "vision": {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4},
                     "text": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}},
    "qwen2vl-100m": {"family": "qwen2-vl", "image_size": 224, "patch_size": 14, "merge_size": 2,
                     "vision": {"embed_dim": 512, "depth": 8, "num_heads": 8, "mlp_ratio": 4},
                     "text": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
                              "num_attention_heads": 12, "num_key_value_heads": 4}},
}


def _preset(name: str) -> dict:
    if name not in VLM_PRESETS:
        raise ValueError(f"unknown VLM preset {name!r}; expected one of {', '.join(VLM_PRESETS)}")
    return VLM_PRESETS[name]


def preset_family(name: str) -> str:
    """``"llava"`` or ``"qwen2-vl"``."""
    return _preset(name)["family"]


def vlm_processor(name: str, tokenizer=None):
    """The HF processor of preset ``name`` (:mod:`fp8coat.train.vlm_processors`); ``tokenizer`` None: the family's
    byte-level tokenizer (:func:`vlm_tokenizer` without texts)."""
    from .vlm_processors import llava_processor, qwen2vl_processor

    p = _preset(name)
    tokenizer = tokenizer if tokenizer is not None else vlm_tokenizer(p["family"])
    if p["family"] == "llava":
        return llava_processor(tokenizer, p["image_size"], p["patch_size"])
    return qwen2vl_processor(tokenizer, p["image_size"], p["patch_size"], p["merge_size"])


def _ids(tokenizer, *tokens: str) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {', '.join(missing)}")
    return ids


def vlm_config(name: str, tokenizer):
    """The HF config (``LlavaConfig`` / ``Qwen2VLConfig``) of preset ``name`` for ``tokenizer``'s vocabulary and
    special token ids."""
    import transformers

    p = _preset(name)
    vocab = len(tokenizer)
    if p["family"] == "llava":
        image, = _ids(tokenizer, "<image>")
        vision = transformers.CLIPVisionConfig(image_size=p["image_size"], patch_size=p["patch_size"], **p["vision"])
        text = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=PRESET_MAX_POSITIONS,
                                        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        **p["text"])
        return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image,
                                        image_seq_length=(p["image_size"] // p["patch_size"]) ** 2,
                                        vision_feature_layer=-1, vision_feature_select_strategy="default",
                                        projector_hidden_act="gelu", tie_word_embeddings=False)
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    half = p["text"]["hidden_size"] // p["text"]["num_attention_heads"] // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    vision = {**p["vision"], "hidden_size": p["text"]["hidden_size"], "patch_size": p["patch_size"],
              "spatial_merge_size": p["merge_size"], "temporal_patch_size": 2}
    text = {**p["text"], "vocab_size": vocab, "max_position_embeddings": PRESET_MAX_POSITIONS,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False}
    return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=image,
                                      video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
                                      tie_word_embeddings=False)


def build_vlm(name: str, tokenizer=None, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0):
    """``(model, processor)``: preset ``name`` with random weights drawn after ``torch.manual_seed(seed)``, in
    ``dtype`` on ``device`` (SDPA attention), and its processor around ``tokenizer`` (None: byte-level).
    ``model.config.image_token_id`` is the processor's ``image_token_id``."""
    import transformers

    processor = vlm_processor(name, tokenizer)
    cfg = vlm_config(name, processor.tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if model.config.image_token_id != processor.image_token_id:
        raise RuntimeError(f"model image_token_id {model.config.image_token_id} != processor's "
                           f"{processor.image_token_id}")
    return model, processor
