"""Sharding the model of a run over its ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each decoder layer is one FSDP unit (its parameters are gathered for its forward and backward, then freed), the
rest of the model (embeddings, final norm, LM head) is the root unit. The root is :class:`Objective`, a module
whose forward computes the loss: FSDP gathers a unit's parameters in that unit's forward, and the chunked loss
uses the LM head's weight without calling the head, so the loss itself must run inside the root's forward.

Parameters are stored sharded along dim 0 in their own dtype (bf16, or fp32 for ``--master-weights fp32`` and
``--optimizer torch``) and gathered as bf16 for the forward and backward (``MixedPrecisionPolicy(param_dtype=
bfloat16)``). Gradients are averaged over the ranks (reduce-scatter) in bf16, or with ``--fsdp-reduce-fp32`` in
fp32 and then rounded once to the parameter's dtype: fp32 parameters keep fp32 gradients, and a sum over more than
two ranks is rounded once instead of at every partial sum (for bf16 parameters on two ranks both give the same
bits: the sum of two bf16 values is rounded once either way).
"""

from __future__ import annotations

import torch

from ..compiling import decoder_layers
from ..nn.fp8_all_gather import enable_fp8_all_gather

__all__ = ["Objective", "reshard", "shard_model"]


class Objective(torch.nn.Module):
    """The loss of a causal LM as a module: ``objective(ids)`` is ``loss(body, ids, autocast, head)`` with the
    chunked loss (``head`` the LM head, ``body`` the decoder), else ``loss(model, ids, autocast)``;
    ``objective(ids, chunked=False)`` always takes the second form (evaluation). ``loss`` has the signature of
    ``fp8coat.train.loop._loss``."""

    def __init__(self, model: torch.nn.Module, loss, autocast: bool, chunked: bool):
        super().__init__()
        self.model = model
        self._loss, self._autocast, self._chunked = loss, autocast, chunked

    def forward(self, ids: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        if chunked and self._chunked:
            return self._loss(self.model.model, ids, self._autocast, self.model.lm_head)
        return self._loss(self.model, ids, self._autocast)


def shard_model(model: torch.nn.Module, objective: Objective, reduce_fp32: bool, fp8_all_gather: bool) -> Objective:
    """Shard ``model`` (whose ``objective`` it is) in place: each decoder layer, then the root ``objective``; with
    ``fp8_all_gather`` the converted linears' weights are gathered as E4M3 (``fp8coat.enable_fp8_all_gather``;
    the step then calls ``fp8coat.precompute_fp8_scales``). Returns ``objective``, now the FSDP root that a step
    calls."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if fp8_all_gather:
        enable_fp8_all_gather(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32 if reduce_fp32 else None)
    for layer in decoder_layers(model) or []:
        fully_shard(layer, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective


def reshard(objective: torch.nn.Module) -> None:
    """Free the root's gathered parameters after a forward without backward (evaluation): the module's parameters
    are then the sharded ones again, which state dicts and optimizers refer to."""
    objective.reshard()
