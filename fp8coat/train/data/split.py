"""Deterministic train/validation split by whole documents."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["split_documents"]


def split_documents(lengths: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, val indices)``, both sorted, of documents with token counts ``lengths`` (>= 2 documents).

    Documents are visited in a random order drawn from ``seed``; each is held out while the held-out total is
    below ``val_fraction`` of all tokens, skipping any document that would take it beyond twice that target.
    If none qualifies, the smallest document is held out. So validation is at least one whole document, about
    ``val_fraction`` of the tokens when documents are small compared with the target, and never everything.
    """
    if len(lengths) < 2:
        raise ValueError("splitting by document needs at least 2 documents")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    lengths = np.asarray(lengths, dtype=np.int64)
    target = val_fraction * float(lengths.sum())
    order = np.random.default_rng(seed).permutation(len(lengths))
    val, held = [], 0
    for i in order:
        if held >= target:
            break
        if held + lengths[i] <= 2 * target:
            val.append(int(i))
            held += int(lengths[i])
    if not val:
        val = [int(order[np.argmin(lengths[order])])]
    if len(val) == len(lengths):  # only possible with val_fraction >= 0.5: keep the largest one for training
        val.remove(int(np.argmax(lengths)))
    val_set = set(val)
    return [i for i in range(len(lengths)) if i not in val_set], sorted(val)
