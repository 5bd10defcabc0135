"""Tokenizers for the VLM presets, made offline: byte-level BPE with each family's special tokens.

Layout of the vocabulary: the family's special tokens first (ids ``0 ..``), then the 256 byte symbols, then the
merges learned from ``texts`` (none without texts: a byte tokenizer). Pre-tokenizer and decoder as the text
path's BPE (:mod:`fp8coat.train.data.tokenizer`: GPT-2 byte-level, no prefix space), so any text encodes.

* ``llava``: ``<unk> <s> </s> <pad> <image>`` (ids 0-4); ``<s>`` is put in front of every text (as Llama's
  tokenizer does), ``</s>`` ends answers, ``<pad>`` pads.
* ``qwen2-vl``: ``<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|>
  <|video_pad|>`` (ids 0-6); no BOS; eos ``<|im_end|>`` (ends answers), pad ``<|endoftext|>`` (also ends captions).

:func:`vlm_tokenizer` returns a ``transformers.PreTrainedTokenizerFast`` (what the HF processors take); trained
tokenizers are cached as ``<cache>/tokenizers/vlm-<family>-bpe<vocab_size>-<key>.json`` (``key`` hashes the texts,
the vocabulary size and the format). Training is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ._atomic import atomic_file
from .corpus import cache_dir
from .tokenizer import _new_bpe, load_tokenizer

__all__ = ["FAMILY_TOKENS", "train_vlm_tokenizer", "vlm_tokenizer", "wrap_tokenizer"]

VLM_TOKENIZER_FORMAT = 1
FAMILY_TOKENS = {
    "llava": {"specials": ("<unk>", "<s>", "</s>", "<pad>", "<image>"),
              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "qwen2-vl": {"specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                              "<|image_pad|>", "<|video_pad|>"),
                 "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
}


def _family(family: str) -> dict:
    if family not in FAMILY_TOKENS:
        raise ValueError(f"unknown VLM family {family!r}; expected one of {', '.join(FAMILY_TOKENS)}")
    return FAMILY_TOKENS[family]


def train_vlm_tokenizer(family: str, texts: Sequence[str] = (), vocab_size: int = 4096):
    """A ``tokenizers.Tokenizer`` for ``family`` with at most ``vocab_size`` entries (fewer if the texts are small;
    merges of pairs seen at least twice), byte-level only when ``texts`` is empty."""
    from tokenizers import pre_tokenizers, processors, trainers

    specials = list(_family(family)["specials"])
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE with {len(specials)} special "
                         f"tokens (needs at least {len(specials) + 256})")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    if [tok.token_to_id(s) for s in specials] != list(range(len(specials))):
        raise RuntimeError(f"the special tokens of {family} did not get ids 0..{len(specials) - 1}")
    bos = _family(family).get("bos_token")
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def wrap_tokenizer(family: str, tokenizer):
    """``tokenizer`` (a ``tokenizers.Tokenizer`` from :func:`train_vlm_tokenizer`) as a
    ``transformers.PreTrainedTokenizerFast`` with the family's bos / eos / pad / unk tokens."""
    from transformers import PreTrainedTokenizerFast

    names = {k: v for k, v in _family(family).items() if k != "specials"}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names)


def vlm_tokenizer(family: str, texts: Sequence[str] | None = None, vocab_size: int = 4096,
                  cache: str | os.PathLike | None = None):
    """The ``PreTrainedTokenizerFast`` of ``family``: byte-level without ``texts``, else a BPE trained on them and
    cached (see the module docstring)."""
    if not texts:
        return wrap_tokenizer(family, train_vlm_tokenizer(family, (), len(_family(family)["specials"]) + 256))
    key_data = json.dumps({"format": VLM_TOKENIZER_FORMAT, "family": family, "vocab_size": vocab_size,
                           "texts": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()})
    key = hashlib.sha256(key_data.encode()).hexdigest()[:16]
    path = Path(cache or cache_dir()) / "tokenizers" / f"vlm-{family}-bpe{vocab_size}-{key}.json"
    if path.is_file():
        return wrap_tokenizer(family, load_tokenizer(path))
    tok = train_vlm_tokenizer(family, texts, vocab_size)
    with atomic_file(path) as tmp:
        tok.save(str(tmp))
    return wrap_tokenizer(family, tok)
