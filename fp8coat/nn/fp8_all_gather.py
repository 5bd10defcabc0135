"""FP8 all-gather of converted linear weights under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 all-gathers every weight before a layer's forward (and again before its backward). A converted linear
only ever uses its weight as E4M3 with one per-tensor scale (``weight_cache.weight_fp8``), so the gather can move
the E4M3 codes instead of BF16: half the bytes, and no quantization of the gathered weight afterwards. The
numerics are those of "gather BF16, then quantize": every rank casts its shard with the same scale, the scale of
the whole weight (``scale_from_amax(max over ranks of the shard amax)``), so the gathered codes are exactly the
codes of the gathered weight.

    fp8coat.convert(model, "coat")
    enable_fp8_all_gather(model)          # before fully_shard: wraps the converted linears' weights
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = fp8coat.AdamW(model.parameters(), record_amax_of=fp8_all_gather_parameters(model))
    ...
    optimizer.step()                      # also records the amax of each gathered weight's new shard
    precompute_fp8_scales(model, optimizer)   # optional: every scale of the next gathers in ONE all-reduce

:func:`precompute_fp8_scales` needs each shard's amax. Given the optimizer that stepped the weights (an
``fp8coat.AdamW`` constructed with ``record_amax_of`` naming them), it takes the amax that the step recorded while
it wrote the shard (:meth:`fp8coat.AdamW.recorded_amax`: no pass over the weights; used only where its version is
the shard's current :meth:`~FP8AllGatherWeight.content_version`, i.e. nothing wrote the shard since); for any
other shard (no optimizer given, a weight it does not record, or written after the step) it reads the shard
(``tensor_amax``). Either way the scales are the same, bit for bit, and take one all-reduce(max).

Two tensor subclasses carry this through FSDP2's all-gather extension hooks:

* :class:`FP8AllGatherWeight` wraps the weight's **local shard** (the parameter's data, in its own dtype: the
  optimizer updates the plain tensor inside, ``sharding.local_tensor``). Its ``fsdp_pre_all_gather`` casts the
  shard to E4M3 with the weight's scale: the one :func:`precompute_fp8_scales` left for these exact shard
  contents (checked by the shard's version counters), else one computed now (the shard's amax, read from it, + an
  all-reduce(max) over the shard group).
* :class:`GatheredFP8Weight` is the **unsharded weight** the layer sees in forward and backward: E4M3 codes
  ``(N, K)`` (a view of FSDP2's all-gather buffer, freed and refilled by FSDP2 like any unsharded parameter) and
  the 0-d fp32 scale; it reports the parameter dtype. :func:`fp8coat.ops.linear.linears` uses its codes and
  scale directly; the weight gradient comes back as a plain tensor of the parameter dtype. Any other use of it
  (e.g. an eval-mode ``F.linear``) sees the dequantized weight.
"""

from __future__ import annotations

import torch

from ..ops.fp8_gather import FP8AllGatherWeight, GatheredFP8Weight, agreed_scales
from .linear import FP8LinearMixin

__all__ = ["FP8AllGatherWeight", "GatheredFP8Weight",  # (the two tensor types: fp8coat.ops.fp8_gather)
           "enable_fp8_all_gather", "precompute_fp8_scales", "fp8_all_gather_parameters"]


def _converted_linears(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, FP8LinearMixin)]


def enable_fp8_all_gather(model: torch.nn.Module) -> int:
    """Wrap the weight of every converted linear layer of ``model`` in :class:`FP8AllGatherWeight` (call after
    ``fp8coat.convert`` and before ``fully_shard``; parameter names and values are unchanged). Returns how many
    weights were wrapped."""
    count = 0
    for module in _converted_linears(model):
        w = module.weight
        if getattr(module, "_fp8coat_transposed", False):
            continue  # (HF Conv1D stores W transposed: gathered as usual)
        if isinstance(w, FP8AllGatherWeight):
            continue  # already wrapped
        if hasattr(w, "_local_tensor"):
            raise ValueError("enable_fp8_all_gather: the model is already sharded (its weights are DTensors); call "
                             "it after fp8coat.convert and before fully_shard")
        module.weight = torch.nn.Parameter(FP8AllGatherWeight(w.data), requires_grad=w.requires_grad)
        count += 1
    return count


def _gathered(model: torch.nn.Module) -> "list[tuple[torch.Tensor, FP8AllGatherWeight]]":
    """(parameter, its local shard) of every FP8-gathered weight of a sharded ``model``."""
    out = []
    for module in _converted_linears(model):
        local = getattr(module.weight, "_local_tensor", None)
        if isinstance(local, FP8AllGatherWeight):
            out.append((module.weight, local))
    return out


def fp8_all_gather_parameters(model: torch.nn.Module) -> "list[torch.Tensor]":
    """The parameters (DTensors) of the FP8-gathered weights of a sharded ``model`` (call after ``fully_shard``):
    what ``fp8coat.AdamW(..., record_amax_of=...)`` takes for :func:`precompute_fp8_scales`."""
    return [p for p, _ in _gathered(model)]


@torch.no_grad()
def precompute_fp8_scales(model: torch.nn.Module, optimizer: "torch.optim.Optimizer | None" = None) -> None:
    """Compute the scale of every FP8-gathered weight of ``model`` with ONE all-reduce (call after the optimizer
    step): the next all-gathers use them instead of one all-reduce per weight.

    ``optimizer``: the ``fp8coat.AdamW`` that stepped the weights. The amax of each shard that it recorded
    (``record_amax_of``) for the shard's current content is taken from it, without reading the shard; the others
    are read from their shards. Without it, every shard is read."""
    weights = _gathered(model)
    if not weights:
        return
    amaxes = None
    if optimizer is not None:
        recorded_amax = getattr(optimizer, "recorded_amax", None)
        if recorded_amax is None:
            raise TypeError(f"precompute_fp8_scales: {type(optimizer).__name__} records no amax; pass an "
                            "fp8coat.AdamW (record_amax_of=fp8_all_gather_parameters(model)) or no optimizer")
        amaxes = [_current_amax(recorded_amax(p), local) for p, local in weights]
    scales = agreed_scales([local._data for _, local in weights], _shard_group(model), amaxes)
    for (_, local), scale in zip(weights, scales):
        local.scale, local.scale_version = scale, local.content_version()


def _current_amax(record, local: FP8AllGatherWeight) -> "torch.Tensor | None":
    """The recorded amax where it belongs to ``local``'s current content, else None."""
    if record is None:
        return None
    amax, version = record
    return amax if version == local.content_version() else None


def _shard_group(model: torch.nn.Module):
    for module in _converted_linears(model):
        w = module.weight
        if hasattr(w, "device_mesh"):
            return w.device_mesh.get_group()
    return None
