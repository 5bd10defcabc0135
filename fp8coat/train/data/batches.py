"""Reading token files: random training windows (resumable) and fixed validation windows.

A token file is a flat array of token ids (``np.uint16`` or ``np.uint32``, native byte order, no header), the
documents of a split each followed by the end-of-text id. A window is ``seq_len + 1`` consecutive tokens: inputs
``w[:, :-1]``, targets ``w[:, 1:]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = ["TokenDataset", "batch_iterator", "eval_batches", "step_generator"]

_SPLIT_NAMES = {"train": "training split", "val": "validation split"}


class TokenDataset:
    """A token file as a read-only ``np.memmap`` (``.tokens``, 1-D, ``dtype``); ``len()`` = number of tokens.

    ``dtype``: default: the ``"dtype"`` of a ``manifest.json`` next to the file (as written by ``prepare_dataset``),
    else ``uint16``. ``split``: name used in messages (default: from the file name, ``train.bin`` -> "training
    split").
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | str | None = None, split: str | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype if dtype is not None else _manifest_dtype(self.path))
        self.split = split or _SPLIT_NAMES.get(self.path.stem, f"token file {self.path.name}")
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {self.path} does not exist")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{self.path} has {size} bytes, not a whole number of {self.dtype} tokens")
        if size == 0:
            raise ValueError(f"token file {self.path} is empty")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, {self.dtype}, {len(self)} tokens)"

    def check_window(self, seq_len: int) -> None:
        """``ValueError`` unless at least one window of ``seq_len + 1`` tokens fits."""
        if seq_len < 1:
            raise ValueError(f"sequence length must be >= 1, got {seq_len}")
        if len(self) < seq_len + 1:
            raise ValueError(f"sequence length {seq_len} needs at least {seq_len + 1} tokens in the {self.split}, "
                             f"which has {len(self)}; use a smaller --seq-len or more data")

    def windows(self, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        """``torch.int64 (len(starts), seq_len + 1)``: the windows starting at ``starts``."""
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
        return torch.from_numpy(self.tokens[idx].astype(np.int64))


def _manifest_dtype(path: Path) -> str:
    try:
        return json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))["dtype"]
    except (OSError, ValueError, KeyError):
        return "uint16"


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` whose state depends only on ``(seed, step)`` (mixed with
    ``np.random.SeedSequence``)."""
    seed, step = int(seed) % 2**64, int(step) % 2**64
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, step >> 32]).generate_state(
        2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) | (int(state[1]) << 32))


def batch_iterator(dataset: TokenDataset, batch_size: int, seq_len: int, seed: int,
                   start_step: int = 0) -> Iterator[torch.Tensor]:
    """Training batches ``torch.int64 (batch_size, seq_len + 1)`` for steps ``start_step, start_step + 1, ...``.

    Step ``i``'s windows start at positions drawn uniformly from ``[0, len(dataset) - seq_len - 1]`` by
    :func:`step_generator(seed, i) <step_generator>`, so a batch depends only on ``(seed, i)``: resuming with
    ``start_step=k`` continues the exact stream. Endless.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    dataset.check_window(seq_len)
    high = len(dataset) - seq_len  # exclusive bound of window starts
    step = int(start_step)
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=step_generator(seed, step))
        yield dataset.windows(starts.numpy(), seq_len)
        step += 1


def eval_batches(dataset: TokenDataset, batch_size: int, seq_len: int, n_batches: int) -> list[torch.Tensor]:
    """``n_batches`` fixed validation batches ``torch.int64 (batch_size, seq_len + 1)``.

    The ``n_batches * batch_size`` windows start at evenly spaced positions from the first to the last possible
    one (they overlap when the split is shorter than that many windows); the same for every call.
    """
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"batch size and number of batches must be >= 1, got {batch_size} and {n_batches}")
    dataset.check_window(seq_len)
    n = batch_size * n_batches
    starts = np.rint(np.linspace(0, len(dataset) - seq_len - 1, num=n)).astype(np.int64)
    return [dataset.windows(starts[b * batch_size:(b + 1) * batch_size], seq_len) for b in range(n_batches)]
