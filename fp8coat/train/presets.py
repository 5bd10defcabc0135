"""Model presets for ``fp8coat train`` (Llama architecture, HF ``LlamaForCausalLM``) and model loading.

==============  ======  ======  =====  ========  ====================================================
preset          hidden  layers  heads  MLP       note
==============  ======  ======  =====  ========  ====================================================
``tiny``          128      4      4       352    CPU default (~0.9M + embeddings)
``25m``           384      6      6      1024
``60m``           640      8     10      1728    the accuracy benchmark's model (~60M with a 16k vocab)
``125m``          768     12     12      2048
``350m``         1024     24     16      2816
``1b``           2048     16     16      5632
``llama2-7b``    4096     32     32     11008    Llama-2-7B shape
==============  ======  ======  =====  ========  ====================================================

Every preset has a context of 4096 positions. Besides a preset name, ``model`` may be a path to an HF config JSON
(random init) or to a pretrained HF checkpoint directory (fine-tuning); the tokenizer's vocabulary must fit the
model's.
"""

from __future__ import annotations

import json
import os

import torch

__all__ = ["PRESETS", "PRESET_MAX_POSITIONS", "PRESET_VOCAB", "build_model", "is_checkpoint_dir", "model_config"]

PRESET_MAX_POSITIONS = 4096  # context length of every preset (RoPE)
PRESET_VOCAB = 32000  # the Llama-2 tokenizer's vocabulary: a preset's when no tokenizer gives one

PRESETS = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352},
    "25m": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1024},
    "60m": {"hidden_size": 640, "num_hidden_layers": 8, "num_attention_heads": 10, "intermediate_size": 1728},
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048},
    "350m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 2816},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "intermediate_size": 5632},
    "llama2-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008},
}


def build_model(model: str, vocab_size: int, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Returns ``(model, source)``: a preset / HF-config model (random init, seeded) or a pretrained checkpoint."""
    import transformers

    if model in PRESETS:
        cfg = transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=PRESET_MAX_POSITIONS,
                                       tie_word_embeddings=False, **PRESETS[model])
        source = f"preset {model}"
    elif is_checkpoint_dir(model):
        m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        _check_vocab(m.config, vocab_size, model)
        _check_positions(m.config, seq_len)
        return m.to(device), f"pretrained {model}"
    elif os.path.isfile(model) or os.path.isdir(model):
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        cfg = transformers.AutoConfig.for_model(**_read_config(path))
        cfg.vocab_size = max(getattr(cfg, "vocab_size", 0) or 0, vocab_size)
        source = f"config {path}"
    else:
        raise ValueError(f"unknown model {model!r}: expected a preset ({', '.join(PRESETS)}), an HF config JSON "
                         "or a pretrained checkpoint directory")
    _check_positions(cfg, seq_len)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return m, source


def is_checkpoint_dir(model: str) -> bool:
    """Whether ``model`` is a folder holding model weights (a pretrained checkpoint to load)."""
    return os.path.isdir(model) and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(model))


def _read_config(path: str) -> dict:
    """An HF model config JSON as a dict; ValueError naming ``path`` if it is not one."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--model {path}: no such file (expected a preset, an HF config JSON or a checkpoint "
                         "directory)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"--model {path} is not an HF config JSON: {err}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"--model {path} is not an HF config JSON (it names no model_type)")
    return raw


def _check_positions(cfg, seq_len: int) -> None:
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"sequence length {seq_len} exceeds the model's max_position_embeddings {limit}")


def _check_vocab(cfg, vocab_size: int, where: str) -> None:
    if vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model at {where} embeds only "
                         f"{cfg.vocab_size}")


def model_config(model: str) -> dict:
    """The HF config dict of ``model`` without building it: a preset (a Llama config, vocabulary
    :data:`PRESET_VOCAB`), a config JSON file, or a folder holding ``config.json``; ValueError otherwise."""
    if model in PRESETS:
        return {"model_type": "llama", "vocab_size": PRESET_VOCAB, "tie_word_embeddings": False, **PRESETS[model]}
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"unknown model {model!r}: expected a preset ({', '.join(PRESETS)}), an HF config JSON or "
                         "a checkpoint directory holding config.json")
    return _read_config(path)
