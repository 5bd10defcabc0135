"""FP8 copies of weights for the forward GEMMs, reused while a weight's bytes are unchanged.

With gradient accumulation one weight serves several forwards between two optimizer steps. Converted linear layers
use a cache only with ``Recipe.cache_fp8_weights`` on (off by default: their weights are quantized in every forward
and nothing is held; a cache costs 1 byte per weight for the whole run). :class:`FP8WeightCache`
keeps its E4M3 per-tensor copy and quantizes again only when the weight's **content** changed, as told on the
device by a 64-bit fingerprint computed in the same pass as the amax the scale needs
(:func:`fp8coat.quantization.refresh_tensor_scale`). So every way of changing a weight is seen by the next
forward: optimizer steps (torch's, fp8coat's, fused kernels writing through raw pointers), in-place edits through
``.data``, ``copy_`` under ``no_grad``, ``load_state_dict``, ``set_``, assigning ``.data``. Per forward the cache
reads the weight once (fingerprint + amax) and, only when it changed, quantizes it (a second read and the FP8
write) into a buffer it owns; no host sync. A fingerprint misses a change with probability about 2^-64.

:func:`weight_fp8` is the one entry point: ``(W8, scale) = weight_fp8(w, cache, fmt)``, called in the forward
of a converted linear layer before its GEMMs. The cache's tensors travel as arguments of the custom op
``fp8coat::refresh_weight_fp8`` (which mutates them), so ``torch.compile`` sees the weight cast as one node of
the layer's graph and every layer's cache as an input of the same kind — no per-layer constants.

While a CUDA graph is being captured eagerly (``torch.cuda.graph``, ``make_graphed_callables``) the cache is
bypassed and the weight is quantized inside the graph, so every replay quantizes the weight's current values.
"""

from __future__ import annotations

import torch

from ..formats import get_format
from ..quantization import quantize_if, quantize_per_tensor, refresh_tensor_scale
from .eager import call, register_eager

__all__ = ["FP8WeightCache", "weight_fp8"]

_CACHED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FP8WeightCache:
    """The E4M3 (or ``fmt``) per-tensor copy of one weight, refreshed when the weight's content changes.

    State on the weight's device: ``q`` (the weight's shape, fp8), ``scale`` (0-d fp32) and ``record`` (int32 (4,):
    the content fingerprint's two lanes, valid, changed-at-the-last-call), allocated on first use and again when
    the weight's shape, dtype or device changes.
    """

    def __init__(self, fmt: str = "e4m3"):
        self.fmt = get_format(fmt)
        self.q: "torch.Tensor | None" = None
        self.scale: "torch.Tensor | None" = None
        self.record: "torch.Tensor | None" = None
        self._meta = None

    def state(self, w: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None":
        """``(q, scale, record)`` for weight ``w`` (allocated now if ``w``'s shape, dtype or device changed), or
        None where the cache does not apply (an FP8 or integer weight; eager CUDA-graph capture)."""
        if w.dtype not in _CACHED_DTYPES:
            return None
        if not torch.compiler.is_compiling() and w.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        meta = (tuple(w.shape), w.dtype, w.device)
        if meta != self._meta:
            self.q = torch.empty(w.shape, dtype=self.fmt.dtype, device=w.device)
            self.scale = torch.ones((), dtype=torch.float32, device=w.device)
            self.record = torch.zeros(4, dtype=torch.int32, device=w.device)
            self._meta = meta
        return self.q, self.scale, self.record

    @property
    def refreshed(self) -> "torch.Tensor | None":
        """int32 (1,) on the device: 1 if the last forward quantized the weight, 0 if it reused the copy."""
        return None if self.record is None else self.record[3:]

    def clear(self) -> None:
        """Make the next forward quantize again, as after a change of the weight (the buffers are kept)."""
        if self.record is not None:
            self.record[2:3].zero_()  # "valid" = 0 (on the device, no sync)

    def release(self) -> None:
        """Free the FP8 copy and its state (the next call allocates and quantizes again)."""
        self.q = self.scale = self.record = self._meta = None

    @property
    def nbytes(self) -> int:
        return 0 if self.q is None else self.q.numel() * self.q.element_size() + 4 + 16

    def __deepcopy__(self, memo) -> "FP8WeightCache":
        return FP8WeightCache(self.fmt.name)  # a copy of a module gets its own (empty) cache

    def __reduce__(self):
        return (FP8WeightCache, (self.fmt.name,))  # pickles hold no FP8 copy


def weight_fp8(w: torch.Tensor, cache: "FP8WeightCache | None", fmt) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(W8, scale)`` of ``w`` (any shape; float): the E4M3/E5M2 per-tensor copy and its 0-d fp32 scale — through
    ``cache`` (``W8`` is then the cache's buffer, overwritten by its next refresh: use it right away; ``scale`` is a
    new tensor), or quantized afresh without one."""
    fmt = get_format(fmt)
    w = w.detach()
    state = cache.state(w) if cache is not None else None
    if state is None:
        return call(_quantize_weight_op, w, fmt.name)
    q, scale, record = state
    return q, call(_refresh_weight_op, w, q, scale, record, fmt.name)


def _quantize_weight_impl(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_per_tensor(w, fmt)


_quantize_weight_op = torch.library.custom_op("fp8coat::quantize_weight_fp8", _quantize_weight_impl, mutates_args=())


@_quantize_weight_op.register_fake
def _(w, fmt):
    return w.new_empty(w.shape, dtype=get_format(fmt).dtype), w.new_empty((), dtype=torch.float32)


def _refresh_weight_impl(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, record: torch.Tensor,
                         fmt: str) -> torch.Tensor:
    """Refresh ``scale`` and ``record`` from ``w``'s fingerprint and amax, quantize ``w`` into ``q`` if it changed;
    returns the scale as a new 0-d fp32 tensor."""
    s = refresh_tensor_scale(w, fmt, record, scale)
    quantize_if(w, fmt, scale, q, record[3:])
    return s


_refresh_weight_op = torch.library.custom_op("fp8coat::refresh_weight_fp8", _refresh_weight_impl,
                                             mutates_args=("q", "scale", "record"))


@_refresh_weight_op.register_fake
def _(w, q, scale, record, fmt):
    return scale.new_empty(())


register_eager(_quantize_weight_op, _quantize_weight_impl)
register_eager(_refresh_weight_op, _refresh_weight_impl)
