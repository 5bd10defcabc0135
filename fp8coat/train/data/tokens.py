"""Token files: a corpus encoded once, split into train/validation by document, cached on disk.

Cache layout (``<cache>`` = the ``cache`` argument or :func:`fp8coat.train.data.cache_dir`)::

    <cache>/datasets/<slug>-<key>/      one prepared dataset (written atomically: complete or absent)
        train.bin                       training tokens, flat uint16 (vocab <= 65536) or uint32, native byte order
        val.bin                         validation tokens, same format
        tokenizer.json                  copy of the tokenizer used (absent for the byte tokenizer)
        manifest.json                   format, key, source, corpus_identity, tokenizer, vocab_size, eot_id,
                                        dtype, split, train/val {file, tokens, documents (names)}, seconds
    <cache>/tokenizers/bpe<V>-<key>.json  trained BPE tokenizers (see ``cached_bpe_tokenizer``)
    <cache_dir>/corpora/<name>.jsonl    fetched named corpora (always under ``cache_dir()``)

``key`` hashes (corpus: names of named corpora, path/size/mtime of every user file; tokenizer; vocabulary size;
val_fraction; seed), so any change of these prepares a new dataset and the same arguments reuse the existing one
without reading or encoding the corpus again. A named corpus that was fetched again with different content (its
hash is recorded in the manifest) also prepares a new dataset; a machine without the corpus files (a dataset
folder copied to a machine without network) reuses the dataset as it is.

Each split is its documents in corpus order, each followed by the end-of-text id. Validation is a seeded random
set of whole documents (:func:`fp8coat.train.data.split.split_documents`); a single-document corpus is instead cut at
``1 - val_fraction`` of its tokens (validation = the tail).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._atomic import atomic_dir, sha256_of_files
from .batches import TokenDataset
from .corpus import MIXES, NAMED_CORPORA, Document, Source, cache_dir, corpus_identity, describe_source, load_corpus
from .split import split_documents
from .tokenizer import ByteTokenizer, cached_bpe_tokenizer, encode_ids, eot_id, load_tokenizer

__all__ = ["PreparedData", "prepare_dataset"]

DATASET_FORMAT = 1
CHUNK_CHARS = 1 << 20  # long documents are encoded in pieces of about this size (see _pieces)
BATCH_CHARS = 8 << 20  # characters per encode_batch call
PROGRESS_CHARS = 8 << 20  # show progress on stderr for corpora at least this large
KNOWN = {*NAMED_CORPORA, *MIXES}


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset: paths, sizes and tokenizer facts, as recorded in its ``manifest.json``."""

    train_path: Path
    val_path: Path
    tokenizer_path: Path | None  # None for the byte tokenizer
    vocab_size: int
    eot_id: int
    n_train_tokens: int
    n_val_tokens: int
    source: str  # human-readable description of the corpus
    dtype: str = "uint16"  # "uint16" | "uint32"
    tokenizer: str = "bpe"  # "bpe" | "bytes" | "file"
    n_train_docs: int = 0
    n_val_docs: int = 0
    split: str = "documents"  # "documents" | "tail" (single-document corpus)
    tokens_sha256: str | None = None  # of train.bin then val.bin (16 hex digits); None in older caches

    def train_dataset(self) -> TokenDataset:
        return TokenDataset(self.train_path, self.dtype, "training split")

    def val_dataset(self) -> TokenDataset:
        return TokenDataset(self.val_path, self.dtype, "validation split")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PreparedData:
        """Read ``<path>/manifest.json``; ``ValueError`` if the files do not match it."""
        path = Path(path)
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        if m.get("format") != DATASET_FORMAT:
            raise ValueError(f"{path}: unsupported dataset format {m.get('format')}")
        data = cls(
            train_path=path / "train.bin", val_path=path / "val.bin",
            tokenizer_path=path / "tokenizer.json" if m["tokenizer"]["kind"] != "bytes" else None,
            vocab_size=m["vocab_size"], eot_id=m["eot_id"], n_train_tokens=m["train"]["tokens"],
            n_val_tokens=m["val"]["tokens"], source=m["source"], dtype=m["dtype"], tokenizer=m["tokenizer"]["kind"],
            n_train_docs=len(m["train"]["documents"]), n_val_docs=len(m["val"]["documents"]), split=m["split"],
            tokens_sha256=m.get("tokens_sha256"),
        )
        itemsize = np.dtype(data.dtype).itemsize
        for file, n in ((data.train_path, data.n_train_tokens), (data.val_path, data.n_val_tokens)):
            if not file.is_file() or file.stat().st_size != n * itemsize:
                raise ValueError(f"{file} is missing or does not hold {n} {data.dtype} tokens")
        if data.tokenizer_path is not None and not data.tokenizer_path.is_file():
            raise ValueError(f"{data.tokenizer_path} is missing")
        return data


def _pieces(text: str, chunk: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk`` characters at line breaks that have non-whitespace on both sides.

    Such a break is a pre-token boundary of the byte-level (GPT-2 regex) pre-tokenizer whether or not the text is
    cut there, so encoding the pieces gives the same ids as encoding the whole text, with parallelism and bounded
    memory for very long documents.
    """
    boundary = re.compile(r"(?<=\S)\n(?=\S)")
    out, start = [], 0
    while len(text) - start > chunk:
        m = boundary.search(text, start + chunk)
        if m is None:
            break
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


def _encode_documents(tokenizer, docs: list[Document], dtype: np.dtype, progress: bool) -> list[np.ndarray]:
    """One ``dtype`` id array per document (no end-of-text)."""
    pieces = [(i, p) for i, d in enumerate(docs) for p in _pieces(d.text)]
    total = sum(len(p) for _, p in pieces)
    tty = sys.stderr.isatty()
    out: list[list[np.ndarray]] = [[] for _ in docs]
    done, n_tokens, t0, start = 0, 0, time.perf_counter(), 0
    # a literal "<|endoftext|>" inside a text is text, not a separator (tokenizers >= 0.14)
    literal = getattr(tokenizer, "encode_special_tokens", None) if not isinstance(tokenizer, ByteTokenizer) else None
    if literal is not None:
        tokenizer.encode_special_tokens = True
    try:
        while start < len(pieces):
            end, size = start, 0
            while end < len(pieces) and (size == 0 or size + len(pieces[end][1]) <= BATCH_CHARS):
                size += len(pieces[end][1])
                end += 1
            for (i, _), ids in zip(pieces[start:end], encode_ids(tokenizer, [p for _, p in pieces[start:end]])):
                out[i].append(ids.astype(dtype, copy=False))
                n_tokens += len(ids)
            done += size
            start = end
            if progress and (tty or start == len(pieces)):
                dt = time.perf_counter() - t0
                print(f"\rfp8coat: encoding {done / 1e6:.1f}/{total / 1e6:.1f} M characters "
                      f"({100 * done / total:.0f}%), {n_tokens / 1e6:.2f} M tokens, {dt:.1f} s",
                      end="" if start < len(pieces) else "\n", file=sys.stderr, flush=True)
    finally:
        if literal is not None:
            tokenizer.encode_special_tokens = literal
    return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in out]


def _write_tokens(path: Path, parts: list[np.ndarray]) -> int:
    """Write the arrays one after the other to ``path``; returns the token count."""
    with path.open("wb") as f:
        for a in parts:
            a.tofile(f)
    return sum(len(a) for a in parts)


def _with_eot(arrays: list[np.ndarray], eot: np.ndarray) -> list[np.ndarray]:
    return [x for a in arrays for x in (a, eot)]


def _slug(source: Source, tokenizer: str, vocab_size: int) -> str:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    names = [item if isinstance(item, str) and item in KNOWN else (Path(item).stem or "files") for item in items]
    base = "+".join(dict.fromkeys(names))
    base = re.sub(r"[^A-Za-z0-9_.+-]", "_", base)[:48]
    tok = {"bpe": f"bpe{vocab_size}", "bytes": "bytes"}.get(tokenizer, "tok")
    return f"{base}-{tok}"


def _tokenizer_identity(tokenizer: str | os.PathLike, vocab_size: int) -> tuple[str, str]:
    """``(kind, identity)`` with kind "bpe" | "bytes" | "file"."""
    if tokenizer == "bytes":
        return "bytes", "bytes"
    if tokenizer == "bpe":
        return "bpe", f"bpe{vocab_size}"
    path = Path(tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {os.fspath(tokenizer)!r} is neither 'bpe', 'bytes' nor an existing "
                                "tokenizer.json file")
    return "file", "file@" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _reuse(folder: Path, source: Source) -> PreparedData | None:
    """The dataset in ``folder`` if intact and made from the same corpus content, else None.

    Named corpora are keyed by name so that a dataset folder copied to a machine without the corpus files is still
    found; where the corpus files are present, their content hash must match the one recorded.
    """
    try:
        data = PreparedData.from_dir(folder)
        recorded = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["corpus_identity"]
    except (ValueError, KeyError, OSError):
        return None  # damaged: rebuild
    local = corpus_identity(source, content=None)
    return data if local is None or local == recorded else None


def prepare_dataset(source: Source = "shakespeare", *, tokenizer: str | os.PathLike = "bpe", vocab_size: int = 16384,
                    val_fraction: float = 0.02, seed: int = 0, cache: str | os.PathLike | None = None
                    ) -> PreparedData:
    """Encode ``source`` (see :func:`load_corpus`) into cached train/validation token files.

    ``tokenizer``: "bpe" (byte-level BPE with ``vocab_size`` entries trained on the whole corpus, cached),
    "bytes" (:class:`ByteTokenizer`, vocabulary 257; ``vocab_size`` ignored) or the path of a ``tokenizer.json``
    (its end-of-text token separates documents). ``val_fraction``: share of tokens held out, as whole documents
    chosen with ``seed``. ``cache``: root for tokenizers and datasets (default :func:`cache_dir`).
    Progress is shown on stderr for corpora of 8 M characters or more.
    Returns the :class:`PreparedData`; a second call with the same arguments reuses the files. ``source`` may also
    be a prepared dataset folder (one holding a ``manifest.json``), returned as it is (other arguments ignored).
    """
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "manifest.json").is_file():
        return PreparedData.from_dir(source)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    kind, tok_identity = _tokenizer_identity(tokenizer, vocab_size)
    root = Path(cache) if cache is not None else cache_dir()
    key_data = {"format": DATASET_FORMAT, "corpus": corpus_identity(source, content=False),
                "tokenizer": tok_identity, "val_fraction": float(val_fraction), "seed": int(seed)}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    final = root / "datasets" / f"{_slug(source, kind, vocab_size)}-{key}"
    if (final / "manifest.json").is_file():
        cached = _reuse(final, source)
        if cached is not None:
            return cached
        shutil.rmtree(final, ignore_errors=True)

    t0 = time.perf_counter()
    docs = load_corpus(source)
    chars = sum(len(d.text) for d in docs)
    progress = chars >= PROGRESS_CHARS
    t_load = time.perf_counter() - t0
    tok_path = None
    if kind == "bytes":
        tok = ByteTokenizer()
    elif kind == "bpe":
        tok, tok_path = cached_bpe_tokenizer(source, vocab_size, cache=root, docs=docs, verbose=progress)
    else:
        tok, tok_path = load_tokenizer(tokenizer), Path(tokenizer)
    t1 = time.perf_counter()
    eot, vocab = eot_id(tok), tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    arrays = _encode_documents(tok, docs, dtype, progress)
    t2 = time.perf_counter()
    eot_arr = np.array([eot], dtype=dtype)
    lengths = [len(a) + 1 for a in arrays]
    if len(docs) >= 2:
        split = "documents"
        train_idx, val_idx = split_documents(lengths, val_fraction, seed)
        train_parts = _with_eot([arrays[i] for i in train_idx], eot_arr)
        val_parts = _with_eot([arrays[i] for i in val_idx], eot_arr)
    else:
        split, train_idx, val_idx = "tail", [0], [0]
        stream = np.concatenate([arrays[0], eot_arr])
        cut = max(1, len(stream) - max(1, round(val_fraction * len(stream))))
        train_parts, val_parts = [stream[:cut]], [stream[cut:]]

    with atomic_dir(final) as tmp:
        n_train = _write_tokens(tmp / "train.bin", train_parts)
        n_val = _write_tokens(tmp / "val.bin", val_parts)
        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
        manifest = {
            "format": DATASET_FORMAT, "key": key, "key_data": key_data, "source": describe_source(source),
            "corpus_identity": corpus_identity(source),
            "tokenizer": {"kind": kind, "origin": os.fspath(tok_path) if tok_path else None},
            "vocab_size": vocab, "eot_id": eot, "dtype": dtype.name, "split": split,
            "val_fraction": val_fraction, "seed": seed, "characters": chars,
            "train": {"file": "train.bin", "tokens": n_train, "documents": [docs[i].name for i in train_idx]},
            "val": {"file": "val.bin", "tokens": n_val, "documents": [docs[i].name for i in val_idx]},
            "tokens_sha256": sha256_of_files(tmp / "train.bin", tmp / "val.bin")[:16],
            "seconds": {"load": round(t_load, 3), "tokenizer": round(t1 - t0 - t_load, 3), "encode": round(t2 - t1, 3),
                        "total": round(time.perf_counter() - t0, 3)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if progress:
        print(f"fp8coat: prepared {final} ({n_train:,} train + {n_val:,} val tokens) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return PreparedData.from_dir(final)
