"""FP8 copies of weights for the forward GEMMs, reused while a weight's bytes are unchanged.

With gradient accumulation one weight serves several forwards between two optimizer steps. :class:`FP8WeightCache`
keeps its E4M3 per-tensor copy and quantizes again only when the weight's **content** changed, as told on the
device by a 64-bit fingerprint computed in the same pass as the amax the scale needs
(:func:`fp8coat.quantization.refresh_tensor_scale`). So every way of changing a weight is seen by the next
forward: optimizer steps (torch's, fp8coat's, fused kernels writing through raw pointers), in-place edits through
``.data``, ``copy_`` under ``no_grad``, ``load_state_dict``, ``set_``, assigning ``.data``. Per forward the cache
reads the weight once (fingerprint + amax) and, only when it changed, quantizes it (a second read and the FP8
write) into a buffer it owns; no host sync. A fingerprint misses a change with probability about 2^-64.

While a CUDA graph is being captured (``torch.cuda.graph``, ``make_graphed_callables``,
``torch.compile(mode="reduce-overhead")``) the cache is bypassed and the weight is quantized inside the graph, so
every replay quantizes the weight's current values.

Caches are registered under an integer handle so that an opaque custom op (``fp8coat::linears``) can find them
at run time from its integer arguments.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from ..formats import get_format
from ..quantization import quantize_if, quantize_per_tensor, refresh_tensor_scale

__all__ = ["FP8WeightCache", "weight_fp8"]

_CACHED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FP8WeightCache:
    """The E4M3 (or ``fmt``) per-tensor copy of one weight, refreshed when the weight's content changes.

    State on the weight's device: ``q`` (the weight's shape, fp8), ``scale`` (0-d fp32) and ``record`` (int32 (4,):
    the content fingerprint's two lanes, valid, changed-at-the-last-call), allocated on first use and again when
    the weight's shape, dtype or device changes.
    """

    _registry: "dict[int, weakref.ref]" = {}
    _next = itertools.count(1)

    def __init__(self, fmt: str = "e4m3"):
        self.fmt = get_format(fmt)
        self.q: "torch.Tensor | None" = None
        self.scale: "torch.Tensor | None" = None
        self.record: "torch.Tensor | None" = None
        self._changed: "torch.Tensor | None" = None  # record[3:], the flag the conditional quantization reads
        self._meta = None
        self._force = False
        self.handle = next(self._next)
        self._registry[self.handle] = weakref.ref(self)
        weakref.finalize(self, self._registry.pop, self.handle, None)

    @classmethod
    def lookup(cls, handle: int) -> "FP8WeightCache | None":
        ref = cls._registry.get(handle)
        return ref() if ref is not None else None

    def get(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W8, scale)`` of ``w``: the cache's FP8 buffer, refreshed if ``w``'s content changed since the last
        call, and the scale as a new 0-d fp32 tensor. ``W8`` is overwritten by later calls: use it right away."""
        w = w.detach()
        if w.dtype not in _CACHED_DTYPES or (w.is_cuda and torch.cuda.is_current_stream_capturing()):
            return quantize_per_tensor(w, self.fmt)
        meta = (tuple(w.shape), w.dtype, w.device)
        if meta != self._meta:
            self.q = torch.empty(w.shape, dtype=self.fmt.dtype, device=w.device)
            self.scale = torch.ones((), dtype=torch.float32, device=w.device)
            self.record = torch.zeros(4, dtype=torch.int32, device=w.device)
            self._changed = self.record[3:]
            self._meta = meta
        scale = refresh_tensor_scale(w, self.fmt, self.record, self.scale, self._force)
        self._force = False
        quantize_if(w, self.fmt, self.scale, self.q, self._changed)
        return self.q, scale

    @property
    def refreshed(self) -> "torch.Tensor | None":
        """int32 (1,) on the device: 1 if the last :meth:`get` quantized the weight, 0 if it reused the copy."""
        return None if self.record is None else self._changed

    def clear(self) -> None:
        """Make the next call quantize again, as after a change of the weight (the buffers are kept)."""
        self._force = True

    def release(self) -> None:
        """Free the FP8 copy and its state (the next call allocates and quantizes again)."""
        self.q = self.scale = self.record = self._changed = self._meta = None

    @property
    def nbytes(self) -> int:
        return 0 if self.q is None else self.q.numel() * self.q.element_size() + 4 + 16

    def __deepcopy__(self, memo) -> "FP8WeightCache":
        return FP8WeightCache(self.fmt.name)  # a copy of a module gets its own (empty) cache under a new handle

    def __reduce__(self):
        return (FP8WeightCache, (self.fmt.name,))  # pickles hold no FP8 copy; the unpickled cache has a new handle


def weight_fp8(w: torch.Tensor, cache: "FP8WeightCache | None", fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W8, scale)`` of ``w`` through ``cache``, or a fresh quantization without one."""
    return cache.get(w) if cache is not None else quantize_per_tensor(w.detach(), fmt)
