"""When the LM head and the cross-entropy can run over chunks of tokens (``fp8coat.ops.cross_entropy``) instead of
on the logits of the whole batch: the one test the trainer applies to language and vision-language models."""

from __future__ import annotations

import torch

__all__ = ["can_chunk_loss"]


def can_chunk_loss(model) -> bool:
    """Whether ``model`` is a body (``model.model``, returning ``last_hidden_state``) plus a bias-free linear
    ``lm_head`` whose logits go to the loss unchanged: no final soft-capping and no logit scale in its config, or in
    the language model's config of a vision-language model (``config.text_config``)."""
    head = getattr(model, "lm_head", None)
    if not (isinstance(head, torch.nn.Linear) and head.bias is None and hasattr(model, "model")):
        return False
    configs = [model.config, getattr(model.config, "text_config", None)]
    return all(getattr(c, "final_logit_softcapping", None) is None and getattr(c, "logit_scale", None) is None
               for c in configs if c is not None)
