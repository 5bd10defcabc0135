"""Tokenizers: a byte-level BPE trained with HF ``tokenizers`` (cached), or plain UTF-8 bytes.

BPE (:func:`train_tokenizer`): GPT-2 style byte-level BPE. ``ByteLevel`` pre-tokenizer (GPT-2 split regex, no
prefix space) and decoder, all 256 byte symbols in the initial alphabet (so any text encodes, no unknown token),
special token ``<|endoftext|>`` = id 0 (the document separator), then the 256 byte symbols, then merges.
Training is deterministic: the same documents and vocabulary size give the same ``tokenizer.json``.
The saved format is the standard ``tokenizers`` JSON (``Tokenizer.from_file`` / ``load_tokenizer``).

Bytes (:class:`ByteTokenizer`): ids 0..255 are the UTF-8 bytes, 256 is ``<|endoftext|>``; vocabulary 257.
Needs no training; for quick CPU demos.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._atomic import atomic_file
from .corpus import Document, Source, cache_dir, corpus_identity, load_corpus

__all__ = [
    "EOT",
    "ByteTokenizer",
    "cached_bpe_tokenizer",
    "encode_ids",
    "eot_id",
    "load_tokenizer",
    "train_tokenizer",
]

EOT = "<|endoftext|>"
EOT_ALIASES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
BPE_FORMAT = 1


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 = byte values, ``eot_id`` = 256, ``vocab_size`` = 257.

    Answers the calls made here to a ``tokenizers.Tokenizer`` (``token_to_id``, ``get_vocab_size``);
    :func:`encode_ids` encodes with :meth:`encode_array`.
    """

    vocab_size = 257
    eot_id = 256

    def encode_array(self, text: str) -> np.ndarray:
        """``np.uint8`` array of the UTF-8 bytes of ``text``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.eot_id if token == EOT else None


def _new_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(docs: Sequence[Document] | Sequence[str], vocab_size: int = 16384):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (fewer if the text is small) on
    ``docs`` (documents or plain strings); tokens seen fewer than twice are not merged."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE (needs at least 258)")
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    if not any(t.strip() for t in texts):
        raise ValueError("cannot train a tokenizer on empty text")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    return tok


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path} is not a tokenizers JSON file: {e}") from e


def eot_id(tokenizer) -> int:
    """The id of the document separator (``<|endoftext|>``, or ``<|end_of_text|>``, ``</s>``, ``<eos>``)."""
    for token in EOT_ALIASES:
        i = tokenizer.token_to_id(token)
        if i is not None:
            return i
    raise ValueError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOT_ALIASES)})")


def encode_ids(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Encode a batch of texts without special tokens; ``np.int64`` id arrays (bytes: ``np.uint8``)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_array(t) for t in texts]
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: no offsets (>= 0.20)
    encodings = encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings]


def cached_bpe_tokenizer(source: Source, vocab_size: int = 16384, *, cache: str | os.PathLike | None = None,
                         docs: Sequence[Document] | None = None, verbose: bool = False):
    """``(tokenizer, path)``: the BPE tokenizer for ``source``, trained once and cached.

    Cache file: ``<cache>/tokenizers/bpe<vocab_size>-<key>.json``, ``key`` = hash of (corpus identity,
    vocab_size, format). ``docs``: the already loaded corpus, to avoid loading it again on a cache miss.
    """
    key_data = json.dumps({"format": BPE_FORMAT, "corpus": corpus_identity(source), "vocab_size": vocab_size})
    key = hashlib.sha256(key_data.encode()).hexdigest()[:16]
    path = Path(cache or cache_dir()) / "tokenizers" / f"bpe{vocab_size}-{key}.json"
    if path.is_file():
        return load_tokenizer(path), path
    docs = load_corpus(source) if docs is None else docs
    chars = sum(len(d.text) for d in docs)
    if verbose:
        print(f"fp8coat: training a byte-level BPE tokenizer (vocab {vocab_size}) on {chars / 1e6:.1f} M characters",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tok = train_tokenizer(docs, vocab_size)
    if verbose:
        print(f"fp8coat: tokenizer trained in {time.perf_counter() - t0:.1f} s -> {path}", file=sys.stderr, flush=True)
    with atomic_file(path) as tmp:
        tok.save(str(tmp))
    return tok, path
