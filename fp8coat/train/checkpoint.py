"""Checkpoints with exact resume: ``<out>/checkpoints/step_000100/`` holds

* the model as an HF checkpoint (``save_pretrained``: config.json + safetensors; loadable for fine-tuning),
* ``optimizer.pt`` (the optimizer's state dict: FP8 moments, side data, bf16 remainders),
* ``state.json`` (step, config, last metrics) and, when there is one, the ``tokenizer.json``.

Data order depends only on (seed, step), so model + optimizer + step are the whole training state. A checkpoint
is written to ``step_N.partial`` and renamed when complete: a crash never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, tokenizer_path: "str | None") -> str:
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the run's own progress line readable
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "step": step}, f, indent=1)
        if tokenizer_path:
            shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(out_dir: str) -> "str | None":
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return os.path.join(root, max(steps)[1]) if steps else None


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Load weights and optimizer state in place; returns the saved ``state.json`` (with ``step``)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no model weights (*.safetensors) in checkpoint {path}")
    weights = {}
    for f in files:
        weights.update(load_file(os.path.join(path, f), device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", [])]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)
