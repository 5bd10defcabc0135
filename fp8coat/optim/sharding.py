"""Optimizer state of sharded (DTensor) parameters, as FSDP2's ``fully_shard`` makes them.

A DTensor parameter is updated through its local shard: the fused step (or the torch reference) reads the local
gradient and writes the local parameter and state, with no communication. The state layout (FP8 or fp32 moments,
master mode) follows the **global** parameter, so every rank holds the same keys; the tensors it holds are the
local shard's:

* ``opt.state[p]`` holds plain local tensors: ``exp_avg`` / ``exp_avg_sq`` / ``master_remainder`` shaped like
  ``p.to_local()``, side tensors ``(*local_lead, ceil(K/G))``. Groups of G run along the last dim, so sharding
  any other dim never splits one (sharding the last dim of a parameter with FP8 moments is refused).
* ``opt.state_dict()`` presents each of them as a DTensor with the parameter's mesh and placements and its
  global shape (no copy), which is what distributed checkpoints (``torch.distributed.checkpoint``) save, load
  and reshard. ``step`` stays a plain 0-d tensor (equal on every rank).

Shards may be uneven or empty (``(0, K)``): an empty shard holds empty state tensors.

Numerics: every element is updated from its own gradient, moments and master, and quantization groups never
cross shards, so the full tensors of parameters and states after a sharded step equal, bit for bit, those of the
same step on the unsharded tensors, for master weights ``fp32``, ``bf16-remainder`` and ``none``. The exception
is ``bf16-stochastic``: its rounding bits are drawn from the step's seed, the index of the tensor in its launch and
the element's offset **within the local shard**, so a sharded run rounds with other bits than an unsharded one
(and, within a step, elements at the same local offset of two shards of a parameter can draw the same bits). Its
parameters then differ from the unsharded run's in the last bits, while the rounding stays unbiased and the
moments (which do not depend on the parameters) stay bit-identical. Non-finite gradient elements are counted on
the rank that holds them (:attr:`AdamW.nonfinite_grad_count` is per rank; sum it across ranks for the total).
"""

from __future__ import annotations

import torch

from ..ops.fp8_gather import FP8AllGatherWeight

__all__ = ["is_sharded", "local_tensor", "check_sharding", "as_dtensor_like", "local_part_of"]

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = None


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage: in-place writes update the DTensor), else
    ``t`` itself; the plain tensor inside a weight wrapped for FP8 all-gather
    (:class:`~fp8coat.ops.fp8_gather.FP8AllGatherWeight`)."""
    if is_sharded(t):
        t = t._local_tensor
    return t._data if isinstance(t, FP8AllGatherWeight) else t


def check_sharding(p: torch.Tensor, quantized: bool, name: str) -> None:
    """Raise ValueError where ``p``'s placements would split quantization groups or are not supported: every
    placement must be ``Replicate()`` or ``Shard(d)``, and ``d`` must not be the last dim when the moments are
    FP8 (``quantized``; groups run along it)."""
    if not is_sharded(p):
        return
    for placement in p.placements:
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise ValueError(f"{name}: fp8coat.AdamW supports Shard and Replicate placements, got {placement}")
        if quantized and placement.dim % p.dim() == p.dim() - 1:
            raise ValueError(
                f"{name} is sharded along its last dim ({placement}), along which fp8coat.AdamW quantizes its "
                "moments in groups: shard another dim (FSDP2's fully_shard shards dim 0), or raise "
                "min_quantized_numel above its size to keep fp32 moments"
            )


def _global_shape(local: torch.Tensor, p: torch.Tensor) -> tuple[int, ...]:
    """Global shape of a state tensor ``local`` of sharded parameter ``p``: ``p``'s shape for a tensor shaped like
    the local shard (moments, remainder); for a per-group side tensor (fewer columns: FP8 moments, whose last dim
    is never sharded) ``p``'s shape with the side tensor's last dim."""
    if local.dim() != p.dim() or p.dim() == 0:  # a 0-d parameter's state is (1,)
        return tuple(local.shape)
    if local.shape == p._local_tensor.shape:
        return tuple(p.shape)
    return (*p.shape[:-1], local.shape[-1])


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def as_dtensor_like(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """State tensor ``local`` of sharded parameter ``p`` as a DTensor with ``p``'s mesh and placements (no copy,
    no communication)."""
    shape = _global_shape(local, p)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def _normalized(placements, dims: int) -> list:
    return [Shard(pl.dim % dims) if isinstance(pl, Shard) else pl for pl in placements]


def _redistributed(value: torch.Tensor, mesh, placements) -> torch.Tensor:
    """The local tensor of DTensor ``value`` redistributed to ``placements`` on ``mesh`` (communicates). The bytes
    travel as uint8, with a trailing dim of the element size: gloo has no collectives for FP8 or int16 tensors."""
    shape = (*value.shape, value.element_size())
    as_bytes = DTensor.from_local(value.to_local().contiguous().unsqueeze(-1).view(torch.uint8), value.device_mesh,
                                  _normalized(value.placements, value.dim()), run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))
    moved = as_bytes.redistribute(mesh, _normalized(placements, value.dim())).to_local().contiguous()
    return moved.view(value.dtype).squeeze(-1)


def local_part_of(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of state tensor ``value`` that belongs with ``p``'s local shard, as a plain tensor.

    ``value`` may be a DTensor (with ``p``'s placements: its local tensor; other placements are redistributed,
    which communicates) or a plain tensor holding the whole state (the slice of this rank). A plain ``p`` takes
    a DTensor's full tensor (communication) and a plain tensor as it is.
    """
    if not is_sharded(p):
        if is_sharded(value):
            return _redistributed(value, value.device_mesh, [Replicate()] * value.device_mesh.ndim)
        return value
    if is_sharded(value):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            return _redistributed(value, p.device_mesh, p.placements)
        return value.to_local()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(value.shape, p.device_mesh, p.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return value[index]
