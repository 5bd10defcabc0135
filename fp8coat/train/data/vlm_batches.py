"""Image-text batches for vision-language models: split, order, padding, and the interface the trainer calls.

    data = prepare_image_text("synthetic", processor, seq_len=None, val_fraction=0.02, seed=0)
    for batch in data.train_batches(batch_size=16, start_step=step):    # endless; dicts for model(**batch)
        loss = model(**batch_to(batch, device, torch.bfloat16)).loss
    val = data.val_batches(batch_size=16, n_batches=8)                   # fixed list, the same for every call

A batch is a ``dict[str, torch.Tensor]`` of ``B`` records, ready for ``model(**batch)``:

* ``input_ids``, ``labels``, ``attention_mask`` (and ``mm_token_type_ids`` for Qwen2-VL): ``int64 (B, L)``, right
  padded with the tokenizer's pad id / ``-100`` / ``0`` / ``0``. ``L`` is the longest record of the batch, or
  ``seq_len`` when one is given (longer records are cut at ``seq_len``; a record whose image and prompt do not fit
  before its first learned token is an error naming its ``file:line``).
* ``labels`` are aligned with ``input_ids`` (HF convention, not shifted): ``-100`` on image tokens, prompt and
  padding (:mod:`fp8coat.train.data.vlm_encode`); the model's loss predicts ``labels[:, 1:]`` from the logits at
  ``[:, :-1]``.
* the processor's image outputs concatenated over the batch: ``pixel_values`` ``float32 (B, 3, H, W)`` for LLaVA;
  ``float32 (sum of patches, C·T·P·P)`` with ``image_grid_thw`` ``int64 (B, 3)`` for Qwen2-VL.

Order: the training records are visited in epochs, each a permutation drawn from ``(seed, epoch)``
(:func:`fp8coat.train.data.batches.step_generator`); batch ``i`` holds positions ``i·B .. (i+1)·B - 1`` of that
endless sequence, so it depends only on ``(seed, B, i)`` and ``start_step=k`` resumes the exact stream. Validation
is a seeded held-out set of whole records (:func:`fp8coat.train.data.split.split_documents` with every record
counted as 1), its batches evenly spaced over it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .batches import step_generator
from .chat_format import ChatFormat, chat_format_for
from .image_records import ImageTextRecord, records_sha256
from .image_sources import describe_image_source, load_image_text
from .split import split_documents
from .vlm_encode import IGNORE, Example, encode_record

__all__ = ["ImageTextData", "batch_rows", "batch_to", "collate", "prepare_image_text", "train_positions"]


def collate(examples: Sequence[Example], pad_id: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of ``examples`` (see the module docstring for the layout)."""
    if not examples:
        raise ValueError("cannot make a batch of no records")
    if seq_len is not None:
        for ex in examples:
            if ex.prompt_len >= seq_len:
                raise ValueError(f"{ex.where}: the image ({ex.n_image_tokens} tokens) and the prompt take "
                                 f"{ex.prompt_len} tokens before the first answer token, which does not fit "
                                 f"seq_len {seq_len}: use a longer --seq-len")
    length = seq_len if seq_len is not None else max(len(ex) for ex in examples)
    fill = {"input_ids": pad_id, "labels": IGNORE}
    batch = {}
    for key in examples[0].tokens:
        out = torch.full((len(examples), length), fill.get(key, 0), dtype=torch.int64)
        for row, ex in enumerate(examples):
            values = ex.tokens[key][:length]
            out[row, :len(values)] = values
        batch[key] = out
    for key in examples[0].vision:
        batch[key] = torch.cat([ex.vision[key] for ex in examples], dim=0)
    return batch


def train_positions(n_records: int, seed: int, start: int, count: int) -> np.ndarray:
    """``int64 (count,)``: the record indices at positions ``start .. start + count - 1`` of the endless training
    sequence (epoch ``e`` = a permutation of ``range(n_records)`` drawn from ``step_generator(seed, e)``)."""
    out = np.empty(count, dtype=np.int64)
    pos, done, cached = start, 0, {}
    while done < count:
        epoch, offset = divmod(pos, n_records)
        if epoch not in cached:
            cached = {epoch: torch.randperm(n_records, generator=step_generator(seed, epoch)).numpy()}
        take = min(count - done, n_records - offset)
        out[done:done + take] = cached[epoch][offset:offset + take]
        done, pos = done + take, pos + take
    return out


@dataclass(frozen=True)
class ImageTextData:
    """Training and validation records with the processor that encodes them (see the module docstring).

    ``source``: a description for logs; ``records_sha256``: of all records (:func:`records_sha256`), to check
    that a resumed run sees the same data.
    """

    train: tuple[ImageTextRecord, ...]
    val: tuple[ImageTextRecord, ...]
    processor: object
    chat_format: ChatFormat
    seq_len: int | None
    seed: int
    source: str
    records_sha256: str

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (else its eos id, else 0): padding is masked either way."""
        tok = self.processor.tokenizer
        for value in (tok.pad_token_id, tok.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    def encode(self, records: Sequence[ImageTextRecord]) -> dict[str, torch.Tensor]:
        """The batch of ``records``, in order."""
        examples = [encode_record(r, self.processor, self.chat_format) for r in records]
        return collate(examples, self.pad_id, self.seq_len)

    def train_batch(self, batch_size: int, step: int) -> dict[str, torch.Tensor]:
        """The training batch of ``step`` (records at positions ``step · batch_size ..`` of the training order)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        idx = train_positions(len(self.train), self.seed, int(step) * batch_size, batch_size)
        return self.encode([self.train[i] for i in idx])

    def train_batches(self, batch_size: int, start_step: int = 0, workers: int = 0
                      ) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches of ``batch_size`` records for steps ``start_step, start_step + 1, ...`` (endless).

        ``workers`` > 0: encoded ahead in that many processes (a ``torch.utils.data.DataLoader``, each worker making
        whole batches, two each in advance); the batches are the same, in the same order.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if workers > 0:
            loader = torch.utils.data.DataLoader(_StepBatches(self, batch_size), batch_size=None,
                                                 sampler=itertools.count(int(start_step)), num_workers=workers,
                                                 prefetch_factor=2)
            yield from loader
            return
        step = int(start_step)
        while True:
            yield self.train_batch(batch_size, step)
            step += 1

    def val_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """``n_batches`` fixed validation batches; their ``n_batches · batch_size`` records are evenly spaced over
        the validation split (repeated when it is smaller)."""
        if batch_size < 1 or n_batches < 1:
            raise ValueError(f"batch size and number of batches must be >= 1, got {batch_size} and {n_batches}")
        idx = np.rint(np.linspace(0, len(self.val) - 1, num=batch_size * n_batches)).astype(np.int64)
        return [self.encode([self.val[i] for i in idx[b * batch_size:(b + 1) * batch_size]])
                for b in range(n_batches)]


class _StepBatches(torch.utils.data.Dataset):
    """Map-style view for a DataLoader: item ``step`` is ``data.train_batch(batch_size, step)``."""

    def __init__(self, data: ImageTextData, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.data.train_batch(self.batch_size, step)


def prepare_image_text(source: str | os.PathLike | Sequence[ImageTextRecord], processor, seq_len: int | None = None,
                       val_fraction: float = 0.02, seed: int = 0, *, cache: str | os.PathLike | None = None,
                       chat_format: ChatFormat | None = None) -> ImageTextData:
    """Load and validate ``source`` (a JSONL file or folder, ``"synthetic"``, ``"synthetic:N"``, ``"digits"``, or
    records from :func:`load_image_text`), split off ``val_fraction`` of the records with ``seed`` and return
    the :class:`ImageTextData` that encodes them with ``processor`` (``chat_format``: default
    :func:`chat_format_for(processor) <chat_format_for>`). ``seq_len``: pad and cut every batch to this length
    (None: pad to the longest record of each batch). The first validation record is encoded here, so a processor
    that does not fit the data fails now rather than at the first step."""
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"sequence length must be >= 2, got {seq_len}")
    if isinstance(source, (str, os.PathLike)):
        records, description = load_image_text(source, cache=cache), describe_image_source(source)
    else:
        records, description = list(source), f"{len(source)} records"
    if len(records) < 2:
        raise ValueError(f"{description}: a train/validation split needs at least 2 records, got {len(records)}")
    train_idx, val_idx = split_documents([1] * len(records), val_fraction, seed)
    data = ImageTextData(tuple(records[i] for i in train_idx), tuple(records[i] for i in val_idx), processor,
                         chat_format or chat_format_for(processor), seq_len, int(seed), description,
                         records_sha256(records))
    data.encode(data.val[:1])
    return data


def batch_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of a batch (one rank's share under FSDP): per-token tensors and per-image tensors by row;
    with ``image_grid_thw`` (Qwen2-VL) ``pixel_values`` by the patches of those rows' images."""
    rows = batch["input_ids"].shape[0]
    if not 0 <= start < stop <= rows:
        raise ValueError(f"rows {start}:{stop} out of a batch of {rows}")
    out = {}
    patches = None
    if "image_grid_thw" in batch:
        ends = torch.cumsum(batch["image_grid_thw"].prod(-1), 0).tolist()
        patches = (ends[start - 1] if start else 0, ends[stop - 1])
    for key, value in batch.items():
        if key == "pixel_values" and patches is not None:
            out[key] = value[patches[0]:patches[1]]
        elif value.shape[0] == rows:
            out[key] = value[start:stop]
        else:
            raise ValueError(f"cannot split {key!r} of shape {tuple(value.shape)} by the {rows} rows of the batch")
    return out


def batch_to(batch: dict[str, torch.Tensor], device: torch.device | str,
             float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The batch on ``device``, floating tensors (``pixel_values``) cast to ``float_dtype`` when given."""
    return {k: v.to(device, dtype=float_dtype if float_dtype is not None and v.is_floating_point() else None)
            for k, v in batch.items()}
