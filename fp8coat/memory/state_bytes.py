"""Bytes of a parameter's weight, gradient, master data and optimizer state, from its shape.

Optimizers (``optimizer``), per parameter of ``n`` elements and shape ``(*lead, K)`` (rows = n / K):

* ``fp8coat`` (:class:`fp8coat.AdamW`, ``fp8coat/optim/layout.py``): a parameter with >= 2 dims and at least
  ``min_quantized_numel`` (4096) elements keeps m and v in FP8 (1 byte each) with, per 1×G group along the last
  dim (G = 128), an fp32 absmax and (expansion on) a uint8 exponent: 2·n + 2·rows·ceil(K/G)·(4 + 1). Smaller and
  1-D parameters keep fp32 m and v: 8·n (a 0-d parameter counts as 1 element). Master data: ``bf16-remainder``
  adds an int16 remainder (2·n); ``fp32`` keeps fp32 parameters (the master is the parameter itself);
  ``bf16-stochastic`` and ``none`` keep nothing.
* ``torch`` (``torch.optim.AdamW``): m and v in the parameter's dtype, 2·n·sizeof(param).
* ``torchao-fp8`` (torchao 0.17 ``AdamWFp8``): a parameter with at least 4096 elements, a multiple of the block
  size 256, keeps m and v as E4M3 codes of the flattened tensor with an fp32 scale per block of 256:
  2·(n + n/256·4); others keep m and v in the parameter's dtype.

The ``step`` counters are not counted (as :func:`fp8coat.memory.optimizer_state_bytes`). Under FSDP2 every rank
holds dim-0 shards of ceil(dim0 / ranks) rows of each parameter and its state (:func:`shard_shape`).
"""

from __future__ import annotations

from .._grid import cdiv
from ..optim.layout import has_fp8_moments
from ..optim.master_weights import MASTER_MODES
from ..optim.state_codec import side_shape

__all__ = ["OPTIMIZERS", "MASTER_MODES", "dtype_bytes", "master_bytes", "optimizer_state_bytes_of", "shard_shape"]

OPTIMIZERS = ("fp8coat", "torch", "torchao-fp8")
TORCHAO_BLOCK = 256
TORCHAO_MIN_NUMEL = 4096


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``"bf16"`` or ``"fp32"``."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    return 2 if dtype == "bf16" else 4


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_shape(shape: tuple, ranks: int) -> tuple:
    """The largest local shard of a parameter of ``shape`` split along dim 0 over ``ranks`` (FSDP2's ``Shard(0)``:
    ceil(dim0 / ranks) rows on the first ranks)."""
    if ranks <= 1 or not shape:
        return tuple(shape)
    return (cdiv(shape[0], ranks), *shape[1:])


def optimizer_state_bytes_of(shape: tuple, optimizer: str, param_dtype: str, *, global_shape: "tuple | None" = None,
                             group_size: int = 128, expansion: bool = True, min_quantized_numel: int = 4096) -> int:
    """Bytes of m and v (and their side data) for a parameter whose local tensor has ``shape``.

    ``global_shape``: the whole parameter's shape where ``shape`` is a shard (fp8coat decides FP8 or fp32 moments
    from the whole parameter; torchao from the local one)."""
    n = _numel(shape)
    if optimizer == "torch":
        return 2 * n * dtype_bytes(param_dtype)
    if optimizer == "torchao-fp8":
        if n >= TORCHAO_MIN_NUMEL and n % TORCHAO_BLOCK == 0:
            return 2 * (n + n // TORCHAO_BLOCK * 4)
        return 2 * n * dtype_bytes(param_dtype)
    if optimizer != "fp8coat":
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    whole = tuple(global_shape) if global_shape is not None else tuple(shape)
    if not has_fp8_moments(whole, min_quantized_numel):
        return 2 * 4 * (n if shape else 1)
    side = _numel(side_shape(shape, group_size))
    return 2 * (n + side * (4 + (1 if expansion else 0)))


def master_bytes(shape: tuple, optimizer: str, master: str) -> int:
    """Bytes of master data beyond the parameter itself: the int16 remainder of ``bf16-remainder``, else 0."""
    if optimizer == "fp8coat" and master == "bf16-remainder":
        return 2 * (_numel(shape) if shape else 1)
    return 0
