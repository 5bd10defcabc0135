"""One record -> model inputs with the model's own HF processor, and labels that learn only the answers.

:func:`encode_record` renders the record (:mod:`fp8coat.train.data.chat_format`), loads the image (PIL, RGB;
transparent pixels on white) and calls ``processor(images=[image], text=[text], return_tensors="pt")``: the
processor resizes and normalizes the image and expands the image placeholder into the number of image tokens the
model expects. The labels come from the tokenizer's character offsets of the same text without the expansion:

* a token is learned (label = its id) when its characters overlap a learned span of the rendered text (a token
  with no characters, such as an added BOS, when it starts inside one); every other token is ``-100``;
* the processor's ``input_ids`` must equal the tokenizer's ids with the single image-placeholder token replaced by
  a block of tokens (the image tokens, plus any marker tokens the processor adds); that whole block is ``-100``.
  Anything else is an error naming the record (the processor changed the text in a way that cannot be aligned).

So labels are ``-100`` on the image tokens, on the prompt (system, user turns, role markers, BOS) and later on
padding (:mod:`fp8coat.train.data.vlm_batches`); the answers and their end tokens keep their ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .chat_format import ChatFormat
from .image_records import ImageTextRecord

__all__ = ["IGNORE", "PER_TOKEN_KEYS", "Example", "encode_record", "learned_mask", "load_rgb"]

IGNORE = -100  # the label of a position that is not learned (HF's and torch's ignore_index)
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # (1, L) processor outputs


@dataclass(frozen=True)
class Example:
    """One encoded record.

    ``tokens``: 1-D ``torch.int64 (L,)`` tensors: ``input_ids``, ``labels``, ``attention_mask`` and any other
    per-token output of the processor (``mm_token_type_ids`` for Qwen2-VL). ``vision``: the processor's image
    outputs as returned for one image (``pixel_values`` ``float32 (1, 3, H, W)`` for LLaVA; ``(patches, C·T·P·P)``
    with ``image_grid_thw`` ``int64 (1, 3)`` for Qwen2-VL). ``prompt_len``: the position of the first learned
    token (everything before it, the image included, must fit a fixed sequence length). ``n_image_tokens``: the
    size of the image block. ``where``: ``"file:line"`` of the record.
    """

    tokens: dict[str, torch.Tensor]
    vision: dict[str, torch.Tensor]
    prompt_len: int
    n_image_tokens: int
    where: str

    def __len__(self) -> int:
        return int(self.tokens["input_ids"].shape[0])


def load_rgb(path) -> Image.Image:
    """The image at ``path`` as an RGB ``PIL.Image`` (transparent parts composited on white)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")


def learned_mask(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> list[bool]:
    """Per token (character range ``(start, end)``): whether it overlaps one of ``spans``; a token with no
    characters (``start == end``) counts when ``start`` lies inside a span."""
    out = []
    for start, end in offsets:
        if start < end:
            out.append(any(start < e and end > s for s, e in spans))
        else:
            out.append(any(s <= start < e for s, e in spans))
    return out


def encode_record(record: ImageTextRecord, processor, chat_format: ChatFormat) -> Example:
    """Encode ``record`` with ``processor`` (see the module docstring); ``ValueError`` naming the record when the
    image cannot be loaded or the processor's tokens cannot be aligned with the text."""
    text, spans = chat_format.render(record)
    tokenizer = processor.tokenizer
    try:
        image = load_rgb(record.image)
    except OSError as err:
        raise ValueError(f"{record.where}: image {record.image} cannot be loaded ({err})") from None
    try:
        out = processor(images=[image], text=[text], return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as err:  # e.g. an image of an aspect ratio the processor refuses
        raise ValueError(f"{record.where}: {type(processor).__name__} failed on this record: {err}") from err
    try:
        plain = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError as err:  # Python ("slow") tokenizers have no character offsets
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets ({err}): the answer tokens are "
                         "found through them, so a fast (tokenizers-backed) tokenizer is needed") from None
    ids0, offsets = list(plain["input_ids"]), [tuple(o) for o in plain["offset_mapping"]]
    placeholder = tokenizer.convert_tokens_to_ids(chat_format.image_token)
    at = [i for i, t in enumerate(ids0) if t == placeholder]
    if len(at) != 1:
        raise ValueError(f"{record.where}: the text holds {len(at)} image placeholder tokens "
                         f"({chat_format.image_token!r}, id {placeholder}) after tokenization, expected 1")
    i = at[0]
    ids = out["input_ids"][0].tolist()
    n_after = len(ids0) - i - 1
    block = len(ids) - i - n_after
    if block < 1 or ids[:i] != ids0[:i] or ids[len(ids) - n_after:] != ids0[i + 1:]:
        raise ValueError(f"{record.where}: the input_ids of {type(processor).__name__} differ from its tokenizer's "
                         "ids of the same text outside the image placeholder: cannot tell the answer tokens")
    learned0 = learned_mask(offsets, spans)
    learned = learned0[:i] + [False] * block + learned0[i + 1:]
    labels = torch.tensor([t if keep else IGNORE for t, keep in zip(ids, learned)], dtype=torch.int64)
    if not bool((labels != IGNORE).any()):
        raise ValueError(f"{record.where}: no answer token to learn after tokenization")
    for key, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(processor).__name__} returned {key!r} as {type(value).__name__}, not a tensor")
    tokens = {key: out[key][0].to(torch.int64) for key in PER_TOKEN_KEYS if key in out}
    tokens.setdefault("attention_mask", torch.ones(len(ids), dtype=torch.int64))
    tokens["labels"] = labels
    vision = {key: value for key, value in out.items() if key not in PER_TOKEN_KEYS}
    prompt_len = int((labels != IGNORE).nonzero()[0, 0])
    return Example(tokens, vision, prompt_len, block, record.where)
