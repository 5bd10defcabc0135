"""The training loss of a vision-language model on an image-text batch (:mod:`fp8coat.train.data.vlm_batches`).

``labels`` are aligned with ``input_ids`` (``-100`` where nothing is learned): position ``t``'s hidden state
predicts ``labels[:, t + 1]``. The loss is the mean cross-entropy over the learned positions of the batch, in fp32,
the value of ``model(**batch).loss`` for HF's LLaVA and Qwen2-VL models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from .chunked_loss import can_chunk_loss

__all__ = ["vlm_loss"]

def vlm_loss(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> torch.Tensor:
    """0-d fp32 mean cross-entropy of ``batch``'s learned tokens (see the module docstring).

    ``chunked`` (when :func:`~fp8coat.train.chunked_loss.can_chunk_loss`): the body runs alone and the LM head
    and cross-entropy go through :func:`fp8coat.ops.cross_entropy.linear_cross_entropy` over chunks of tokens, so
    the logits are never kept for backward; else the logits of the whole batch are computed.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts labels[:, t + 1]
    if chunked and can_chunk_loss(model):
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden, model.lm_head.weight, targets)
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
