"""The two tensor types of FSDP2's FP8 all-gather (used through ``fp8coat.nn.fp8_all_gather``).

* :class:`FP8AllGatherWeight` wraps a weight's local shard; FSDP2 calls its ``fsdp_pre_all_gather`` (cast the
  shard to E4M3 with the whole weight's scale) and ``fsdp_post_all_gather``.
* :class:`GatheredFP8Weight` is the gathered weight: E4M3 codes and one per-tensor scale, consumed by
  :func:`fp8coat.ops.linear.linears` without quantizing it again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from ..formats import E4M3
from ..quantization import quantize_per_tensor, tensor_amax
from ..quantization.reference import scale_from_amax

__all__ = ["FP8AllGatherWeight", "GatheredFP8Weight", "agreed_scales", "stand_in"]

aten = torch.ops.aten

# ops FSDP2 applies to a sharded parameter's data (sharding, padding, copying in/out): their results stay wrapped
_KEEP_WRAPPED = {
    aten.view.default, aten.as_strided.default, aten._unsafe_view.default, aten.slice.Tensor, aten.split.Tensor,
    aten.split_with_sizes.default, aten.detach.default, aten.clone.default, aten.alias.default,
    aten.new_zeros.default, aten.empty_like.default, aten.zeros_like.default,
}


class FP8AllGatherWeight(torch.Tensor):
    """A weight (or its local shard) whose FSDP2 all-gather moves E4M3 codes.

    ``data``: the plain tensor (any float dtype; the optimizer reads and writes it); every op on the wrapper runs
    on it, and those that FSDP2 uses to shard and copy keep the result wrapped. ``scale`` (filled by
    :func:`fp8coat.nn.fp8_all_gather.precompute_fp8_scales`): the 0-d fp32 scale of the whole weight, and
    ``scale_version``: the :meth:`content_version` it was computed for (an amax that ``fp8coat.AdamW`` recorded
    for this shard carries the same kind of version).
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor):
        self._data = data
        self.scale: "torch.Tensor | None" = None
        self.scale_version: "tuple[int, int] | None" = None
        self._codes = None  # ((content version, scale), codes): the last cast of this shard, reused while valid

    def content_version(self) -> tuple[int, int]:
        """Changes whenever the weight is written in place: through this wrapper (its version counter) or directly
        into the plain tensor inside (the optimizer's writes: that tensor's counter)."""
        return self._version, self._data._version

    def __repr__(self) -> str:
        return f"FP8AllGatherWeight({self._data!r})"

    def __reduce_ex__(self, protocol):
        return self._data.__reduce_ex__(protocol)  # saved (torch.save, DCP) as the plain tensor it wraps

    def __tensor_flatten__(self):
        return ["_data"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return FP8AllGatherWeight(inner["_data"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unwrapped = tree_map(lambda t: t._data if isinstance(t, FP8AllGatherWeight) else t, (args, kwargs))
        out = func(*unwrapped[0], **unwrapped[1])
        if func is aten.copy_.default:
            return args[0]
        if func in _KEEP_WRAPPED:
            return tree_map(lambda t: FP8AllGatherWeight(t) if isinstance(t, torch.Tensor) else t, out)
        return out

    # ---- FSDP2 all-gather extension ------------------------------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """``((codes,), (scale,))``: this shard (padded to FSDP2's even shard size) cast to E4M3 with the whole
        weight's scale, as uint8 (all-gathered as bytes)."""
        shard = self._data
        version = self.content_version()
        scale = self.scale
        if scale is None or self.scale_version != version:  # (every rank: their shards change together)
            scale = agreed_scales([shard], mesh.get_group())[0]
            self.scale, self.scale_version = scale, version  # the backward's gather takes it again
        key = (version, scale)
        if self._codes is not None and self._codes[0][0] == version and self._codes[0][1] is scale:
            return (self._codes[1],), (scale,)  # the backward's gather of an unchanged shard: cast once per step
        rows = -(-outer_size[0] // mesh.size())  # FSDP2 pads every shard to the same number of rows
        codes = torch.empty((rows, *shard.shape[1:]), dtype=E4M3.dtype, device=shard.device)
        codes[shard.shape[0]:].zero_()
        if shard.numel():
            codes[: shard.shape[0]] = quantize_per_tensor(shard, E4M3, scale)[0]
        codes = codes.view(torch.uint8)
        self._codes = (key, codes)
        return (codes,), (scale,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (codes,) = all_gather_outputs
        (scale,) = metadata
        codes = codes.view(E4M3.dtype)
        if out is not None:  # FSDP2 refilled the buffer behind out's codes: only the scale is new (a new tensor:
            out._scale = scale.clone()  # the last one may be saved for backward)
            return None
        return GatheredFP8Weight(codes, scale.clone(), param_dtype), (codes,)


def agreed_scales(shards: "list[torch.Tensor]", group,
                  amaxes: "list[torch.Tensor | None] | None" = None) -> "list[torch.Tensor]":
    """The E4M3 scale of each whole weight from the local ``shards``: local amaxes, one all-reduce(max) over
    ``group``, scale_from_amax. Returns 0-d fp32 tensors.

    ``amaxes``: per shard, its amax where the caller already has it (a 0-d fp32 tensor equal to ``tensor_amax``
    of the shard, e.g. recorded by the optimizer step that wrote it), or None: read from the shard here."""
    device = shards[0].device
    known = amaxes if amaxes is not None else [None] * len(shards)
    amax = torch.stack([a.reshape(()) if a is not None
                        else tensor_amax(s).float().reshape(()) if s.numel() else torch.zeros((), device=device)
                        for s, a in zip(shards, known, strict=True)])
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scales = scale_from_amax(amax, E4M3)
    return list(scales.unbind(0))


_VIEWS = (aten.as_strided.default, aten.view.default, aten.detach.default, aten.alias.default,
          aten._unsafe_view.default)


class GatheredFP8Weight(torch.Tensor):
    """A weight held as FP8 ``codes`` and a 0-d fp32 ``scale``: its value is ``codes · scale`` in ``dtype`` (the
    parameter dtype it reports). Views (``view``, ``as_strided``, ``detach``) stay gathered weights; every other
    op computes with the dequantized weight (correct, not fast: the FP8 linear layers never need it)."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, strides=codes.stride(), storage_offset=codes.storage_offset(), dtype=dtype,
            device=codes.device, requires_grad=False,
        )

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self._codes = codes
        self._scale = scale

    def __repr__(self) -> str:
        return f"GatheredFP8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, codes={self._codes.dtype})"

    def fp8(self) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(codes, scale)``: the FP8 codes (this tensor's shape) and the 0-d fp32 scale."""
        return self._codes, self._scale

    def dequantized(self) -> torch.Tensor:
        return (self._codes.float() * self._scale).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VIEWS:
            self, *rest = args
            return GatheredFP8Weight(func(self._codes, *rest, **kwargs), self._scale, self.dtype)
        args, kwargs = tree_map(lambda t: t.dequantized() if isinstance(t, GatheredFP8Weight) else t, (args, kwargs))
        return func(*args, **kwargs)


class _StandIn(torch.autograd.Function):
    """A zero-memory tensor of ``w``'s shape and dtype whose gradient is ``w``'s."""

    @staticmethod
    def forward(ctx, w):
        return torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad


def stand_in(w: GatheredFP8Weight) -> torch.Tensor:
    """A plain tensor standing in for ``w`` in an autograd graph (shape and dtype only, no memory): the gradient
    computed for it becomes ``w``'s gradient."""
    return _StandIn.apply(w)
