"""Data layer: corpora, tokenizers, token files, batches (CPU, small corpora; the Debian corpora only with
FP8COAT_SLOW_TESTS=1 since they are downloaded)."""

import itertools
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from fp8coat.train.data import (
    ByteTokenizer,
    PreparedData,
    TokenDataset,
    batch_iterator,
    describe_source,
    eval_batches,
    load_corpus,
    load_tokenizer,
    prepare_dataset,
    split_documents,
    train_tokenizer,
)
from fp8coat.train.data import corpus as corpus_mod
from fp8coat.train.data import debian as debian_mod
from fp8coat.train.data import tokenizer as tokenizer_mod
from fp8coat.train.data import tokens as tokens_mod
from fp8coat.train.data._atomic import atomic_dir, atomic_file

N_DOCS = 12


def _marker(i: int) -> str:
    return f"MARKER{i:02d}Q"


@pytest.fixture
def folder(tmp_path):
    """12 documents (.txt/.md/.rst in two subfolders) each with a unique marker, plus files that must be skipped."""
    root = tmp_path / "corpus"
    for i in range(N_DOCS):
        sub = root / ("odd" if i % 2 else "even")
        sub.mkdir(parents=True, exist_ok=True)
        lines = [f"{_marker(i)} line {j}: the quick brown fox jumps over {i * j} lazy dogs." for j in range(30 + 5 * i)]
        (sub / f"doc{i:02d}{('.txt', '.md', '.rst')[i % 3]}").write_text("\n".join(lines) + "\n")
    (root / "skip.py").write_text("print('not a text file')\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("hidden\n")
    return root


def _files(cache) -> list:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))


# ---- corpora ---------------------------------------------------------------------------------------------------


def test_folder_documents_sorted_and_filtered(folder):
    docs = load_corpus(folder)
    assert len(docs) == N_DOCS
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert all(d.name.startswith(folder.as_posix() + "/") for d in docs)
    assert not any("skip.py" in d.name or "secret" in d.name for d in docs)
    assert {d.text.split()[0] for d in docs} == {_marker(i) for i in range(N_DOCS)}


def test_file_list_and_comma_sources(folder, tmp_path):
    extra = tmp_path / "extra.dat"
    extra.write_bytes(b"first line\r\nsecond line\r\n")  # any extension when named; CRLF normalized
    assert load_corpus(extra) == [(str(extra), "first line\nsecond line\n")]
    both = load_corpus([extra, folder])
    assert len(both) == N_DOCS + 1 and both[0].name == str(extra)
    assert load_corpus(f"{extra},{folder}") == both
    assert describe_source([extra, "mix"]) == f"{extra} + mix (shakespeare + milton + gcide + kjv)"


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a named corpus .* nor an existing file or folder"):
        load_corpus(tmp_path / "missing")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"no text files \(\*\.txt, \*\.md, \*\.rst\) found under .*empty"):
        load_corpus(empty_dir)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "good.txt").write_text("some text\n")
    (mixed / "blank.md").write_text("  \n\n")
    (mixed / "zero.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty text files: .*blank\.md, .*zero\.txt$"):
        load_corpus(mixed)
    with pytest.raises(ValueError, match="empty text file: .*zero.txt"):
        load_corpus(mixed / "zero.txt")
    with pytest.raises(ValueError, match="empty list"):
        load_corpus([])


def test_apt_failure_is_reported_and_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8COAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(debian_mod.shutil, "which", lambda name: "/usr/bin/" + name)

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "Reading package lists...\nE: Unable to locate package X\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError,
                       match="(?s)could not download dict-gcide via apt-get: .*E: Unable to locate package"):
        load_corpus("gcide")
    assert not [p for p in _files(tmp_path / "cache") if p.endswith(".jsonl") or "partial" in p]


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x.bin").write_bytes(b"12")
        raise RuntimeError("interrupted")
    assert _files(tmp_path) == []
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "a.txt").read_text() == "whole" and _files(tmp_path) == ["a.txt"]


# ---- split -----------------------------------------------------------------------------------------------------


def test_split_documents_properties():
    lengths = list(np.random.default_rng(0).integers(50, 500, size=200))
    train, val = split_documents(lengths, 0.05, seed=1)
    assert (train, val) == split_documents(lengths, 0.05, seed=1)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    share = sum(lengths[i] for i in val) / sum(lengths)
    assert 0.04 < share < 0.07
    assert len({tuple(split_documents(lengths, 0.05, seed=s)[1]) for s in range(5)}) == 5
    # documents larger than the target: still one whole document, never all of them
    assert len(split_documents([100, 100, 100], 0.02, seed=0)[1]) == 1
    assert split_documents([1000, 10], 0.02, seed=0) == ([0], [1])
    with pytest.raises(ValueError):
        split_documents([10], 0.1, seed=0)


# ---- tokenizers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_slice():
    return load_corpus("shakespeare")[:3]  # ~400 K characters (fetched once into the cache)


def test_bpe_deterministic_and_round_trip(shakespeare_slice, tmp_path):
    tok = train_tokenizer(shakespeare_slice, vocab_size=512)
    assert tok.to_str() == train_tokenizer(shakespeare_slice, vocab_size=512).to_str()
    assert tok.get_vocab_size() == 512 and tok.token_to_id("<|endoftext|>") == 0
    text = "To be, or not to be -- naïve café, 日本語 🙂\n\ttabs  and  spaces\r\n"
    ids = tok.encode(text).ids
    assert 0 not in ids and tok.decode(ids) == text
    tok.save(str(tmp_path / "tok.json"))
    assert load_tokenizer(tmp_path / "tok.json").encode(text).ids == ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.json")


def test_byte_tokenizer_encodes_utf8_bytes():
    tok = ByteTokenizer()
    text = "naïve 🙂"
    (ids,) = tokenizer_mod.encode_ids(tok, [text])
    assert ids.dtype == np.uint8 and ids.tobytes() == text.encode("utf-8")
    assert (tok.get_vocab_size(), tokenizer_mod.eot_id(tok)) == (257, 256)


def test_pieces_encode_like_whole_text(shakespeare_slice):
    tok = train_tokenizer(shakespeare_slice, vocab_size=400)
    text = shakespeare_slice[0].text[:60_000] + "\n  indented\n\nnext  \nline\n"
    pieces = tokens_mod._pieces(text, chunk=2_000)
    assert len(pieces) > 10 and "".join(pieces) == text
    (ids,) = tokens_mod._encode_documents(tok, [corpus_mod.Document("d", text)], np.dtype(np.uint16), False)
    assert ids.tolist() == tok.encode(text).ids


# ---- prepared datasets ----------------------------------------------------------------------------------------


def _decode_bytes(path) -> str:
    """A token file of the byte tokenizer as text, its end-of-text id (256) as ``<|endoftext|>``."""
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    return b"".join(b"<|endoftext|>" if i == 256 else bytes([i]) for i in ids).decode("utf-8")


def test_prepare_is_deterministic_and_splits_by_document(folder, tmp_path):
    a = prepare_dataset(folder, tokenizer="bytes", val_fraction=0.2, seed=3, cache=tmp_path / "c1")
    b = prepare_dataset(folder, tokenizer="bytes", val_fraction=0.2, seed=3, cache=tmp_path / "c2")
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.val_path.read_bytes() == b.val_path.read_bytes()
    assert (a.vocab_size, a.eot_id, a.dtype, a.tokenizer_path, a.split) == (257, 256, "uint16", None, "documents")

    docs = load_corpus(folder)
    manifest = json.loads((a.train_path.parent / "manifest.json").read_text())
    val_names = manifest["val"]["documents"]
    assert val_names and not set(val_names) & set(manifest["train"]["documents"])
    assert len(val_names) + len(manifest["train"]["documents"]) == N_DOCS
    train_text, val_text = _decode_bytes(a.train_path), _decode_bytes(a.val_path)
    for d in docs:
        held_out, marker = d.name in val_names, d.text.split()[0]
        assert (marker in val_text) == held_out and (marker in train_text) != held_out
    assert val_text == "".join(d.text + "<|endoftext|>" for d in docs if d.name in val_names)
    total = sum(len(d.text.encode()) + 1 for d in docs)
    assert a.n_train_tokens + a.n_val_tokens == total and 0.1 < a.n_val_tokens / total < 0.4

    folders = [prepare_dataset(folder, tokenizer="bytes", val_fraction=0.2, seed=s, cache=tmp_path / "c1"
                               ).train_path.parent for s in range(4)]
    val_sets = {tuple(json.loads((f / "manifest.json").read_text())["val"]["documents"]) for f in folders}
    assert len(val_sets) > 1  # the seed chooses the held-out documents


def test_dataset_manifest_records_the_token_files_hash(folder, tmp_path):
    import hashlib

    data = prepare_dataset(folder, tokenizer="bytes", cache=tmp_path)
    digest = hashlib.sha256(data.train_path.read_bytes() + data.val_path.read_bytes()).hexdigest()[:16]
    assert data.tokens_sha256 == digest


def test_cache_reuse_and_invalidation(folder, tmp_path, monkeypatch):
    calls = []
    encode = tokens_mod._encode_documents
    monkeypatch.setattr(tokens_mod, "_encode_documents", lambda *a: calls.append(1) or encode(*a))
    first = prepare_dataset(folder, tokenizer="bytes", cache=tmp_path)
    mtime = first.train_path.stat().st_mtime_ns
    again = prepare_dataset(folder, tokenizer="bytes", cache=tmp_path)
    assert again == first and len(calls) == 1 and again.train_path.stat().st_mtime_ns == mtime
    prepare_dataset(folder, tokenizer="bytes", cache=tmp_path, seed=1)
    assert len(calls) == 2
    changed = min(folder.rglob("doc03*"))
    changed.write_text(changed.read_text() + "one more line\n")
    prepare_dataset(folder, tokenizer="bytes", cache=tmp_path)
    assert len(calls) == 3
    assert len(list((tmp_path / "datasets").iterdir())) == 3


def test_failure_mid_write_leaves_no_partial_files(folder, tmp_path, monkeypatch):
    write = tokens_mod._write_tokens

    def failing(path, parts):
        write(path, parts[:1])
        raise OSError("disk full")

    monkeypatch.setattr(tokens_mod, "_write_tokens", failing)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(folder, tokenizer="bytes", cache=cache)
    assert _files(cache) == ["datasets"]
    monkeypatch.setattr(tokens_mod, "_write_tokens", write)
    data = prepare_dataset(folder, tokenizer="bytes", cache=cache)
    assert sorted(p.name for p in data.train_path.parent.iterdir()) == ["manifest.json", "train.bin", "val.bin"]


def test_named_corpus_cache_and_offline_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8COAT_CACHE", str(tmp_path / "home"))
    fetched, version = [], ["first"]

    def fetch():
        fetched.append(1)
        return [(f"tiny/{c}", f"{c} {version[0]} text\n" * 50) for c in "abcd"], "tiny 1.0"

    monkeypatch.setitem(corpus_mod.NAMED_CORPORA, "tiny", fetch)
    calls = []
    encode = tokens_mod._encode_documents
    monkeypatch.setattr(tokens_mod, "_encode_documents", lambda *a: calls.append(1) or encode(*a))
    data = prepare_dataset("tiny", tokenizer="bytes", val_fraction=0.25, cache=tmp_path / "ds")
    first_tokens = data.train_path.read_bytes()
    header = json.loads((tmp_path / "home" / "corpora" / "tiny.jsonl").read_text().splitlines()[0])
    assert (header["documents"], header["origin"], len(fetched)) == (4, "tiny 1.0", 1)
    assert [d.name for d in load_corpus("tiny")] == ["tiny/a", "tiny/b", "tiny/c", "tiny/d"] and len(fetched) == 1

    (tmp_path / "home" / "corpora" / "tiny.jsonl").unlink()  # a machine with the dataset but not the corpus
    assert prepare_dataset("tiny", tokenizer="bytes", val_fraction=0.25, cache=tmp_path / "ds") == data
    assert (len(fetched), len(calls)) == (1, 1)
    assert prepare_dataset(data.train_path.parent) == data  # a dataset folder is a source too

    version[0] = "second"  # fetched again (it is not cached here) with other content: prepared again
    load_corpus("tiny")
    assert len(fetched) == 2
    again = prepare_dataset("tiny", tokenizer="bytes", val_fraction=0.25, cache=tmp_path / "ds")
    assert len(calls) == 2 and again.train_path.read_bytes() != first_tokens
    assert "second" in _decode_bytes(again.train_path) and "first" not in _decode_bytes(again.train_path)


def test_single_document_is_cut_at_the_tail(tmp_path):
    file = tmp_path / "one.txt"
    file.write_text("".join(f"line {i} of a single long document\n" for i in range(300)))
    data = prepare_dataset(file, tokenizer="bytes", val_fraction=0.1, cache=tmp_path / "cache")
    stream = file.read_bytes() + bytes([0])
    assert data.split == "tail" and data.n_val_tokens == round(0.1 * len(stream))
    joined = np.concatenate([np.fromfile(data.train_path, np.uint16), np.fromfile(data.val_path, np.uint16)])
    assert joined[:-1].astype(np.uint8).tobytes() == file.read_bytes() and joined[-1] == 256


def test_bpe_dataset_with_cached_tokenizer(folder, tmp_path, monkeypatch):
    trained = []
    train = tokenizer_mod.train_tokenizer
    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", lambda *a, **k: trained.append(1) or train(*a, **k))
    data = prepare_dataset(folder, tokenizer="bpe", vocab_size=300, val_fraction=0.2, cache=tmp_path)
    assert (data.tokenizer, data.eot_id, data.vocab_size) == ("bpe", 0, 300)
    tok = load_tokenizer(data.tokenizer_path)
    val_ids = np.fromfile(data.val_path, np.uint16)
    assert val_ids[-1] == 0 and (val_ids == 0).sum() == data.n_val_docs
    docs = {d.name: d.text for d in load_corpus(folder)}
    val_names = json.loads((data.train_path.parent / "manifest.json").read_text())["val"]["documents"]
    assert tok.decode(val_ids.tolist()) == "".join(docs[n] for n in val_names)
    prepare_dataset(folder, tokenizer="bpe", vocab_size=300, val_fraction=0.2, seed=7, cache=tmp_path)
    assert len(trained) == 1  # another split of the same corpus reuses the tokenizer
    assert len(list((tmp_path / "tokenizers").glob("bpe300-*.json"))) == 1
    by_path = prepare_dataset(folder, tokenizer=data.tokenizer_path, val_fraction=0.2, cache=tmp_path)
    assert by_path.tokenizer == "file" and by_path.val_path.read_bytes() == data.val_path.read_bytes()
    with pytest.raises(FileNotFoundError, match="neither 'bpe', 'bytes' nor an existing tokenizer.json"):
        prepare_dataset(folder, tokenizer=tmp_path / "missing.json", cache=tmp_path)


def test_shakespeare_plays_are_documents(tmp_path):
    data = prepare_dataset("shakespeare", tokenizer="bytes", cache=tmp_path)
    docs = load_corpus("shakespeare")
    assert len(docs) == 42 and data.n_train_docs + data.n_val_docs == 42 and data.n_val_docs >= 1
    assert data.n_train_tokens + data.n_val_tokens == sum(len(d.text.encode()) + 1 for d in docs)
    assert 0.01 < data.n_val_tokens / (data.n_train_tokens + data.n_val_tokens) < 0.06
    assert PreparedData.from_dir(data.train_path.parent) == data


def test_large_vocabulary_uses_uint32(folder, tmp_path, monkeypatch):
    class WideBytes(ByteTokenizer):
        vocab_size = 70_000
        eot_id = 69_999

    monkeypatch.setattr(tokens_mod, "ByteTokenizer", WideBytes)
    data = prepare_dataset(folder, tokenizer="bytes", cache=tmp_path / "cache")
    assert data.dtype == "uint32" and data.train_path.stat().st_size == 4 * data.n_train_tokens
    batch = next(batch_iterator(data.train_dataset(), 2, 8, seed=0))
    assert batch.dtype == torch.int64 and int(batch.max()) < 70_000
    assert int(data.train_dataset().tokens[-1]) == 69_999
    assert TokenDataset(data.val_path).dtype == np.uint32  # dtype from the manifest next to the file


# ---- batches ---------------------------------------------------------------------------------------------------


@pytest.fixture
def ramp(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    return TokenDataset(path, np.uint16)


def test_batches_are_windows_and_resume_exactly(ramp):
    batches = list(itertools.islice(batch_iterator(ramp, 4, 16, seed=5), 8))
    assert all(b.shape == (4, 17) and b.dtype == torch.int64 for b in batches)
    assert all(torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 16, dtype=torch.int64)) for b in batches)
    assert max(int(b.max()) for b in batches) <= 4999
    again = list(itertools.islice(batch_iterator(ramp, 4, 16, seed=5), 8))
    assert all(torch.equal(x, y) for x, y in zip(batches, again)) and len(again) == 8
    resumed = list(itertools.islice(batch_iterator(ramp, 4, 16, seed=5, start_step=5), 3))
    assert all(torch.equal(x, y) for x, y in zip(batches[5:], resumed)) and len(resumed) == 3
    other = list(itertools.islice(batch_iterator(ramp, 4, 16, seed=6), 8))
    assert not any(torch.equal(x, y) for x, y in zip(batches, other))
    assert len(ramp) == 5000


def test_eval_batches_fixed_and_evenly_spaced(ramp):
    batches = eval_batches(ramp, 3, 99, n_batches=4)
    assert len(batches) == 4 and all(b.shape == (3, 100) for b in batches)
    starts = torch.cat(batches)[:, 0]
    assert starts[0] == 0 and torch.cat(batches)[-1, -1] == 4999
    gaps = starts[1:] - starts[:-1]
    assert int(gaps.max() - gaps.min()) <= 1
    assert all(torch.equal(x, y) for x, y in zip(batches, eval_batches(ramp, 3, 99, n_batches=4)))


def test_sequence_longer_than_split(tmp_path):
    path = tmp_path / "val.bin"
    np.zeros(1200, dtype=np.uint16).tofile(path)
    val = TokenDataset(path, np.uint16)
    message = ("sequence length 2048 needs at least 2049 tokens in the validation split, which has 1200; "
               "use a smaller --seq-len or more data")
    with pytest.raises(ValueError) as err:
        eval_batches(val, 2, 2048, 1)
    assert str(err.value) == message
    with pytest.raises(ValueError, match="training split"):
        next(batch_iterator(TokenDataset(path, np.uint16, "training split"), 2, 1200, seed=0))
    assert next(batch_iterator(val, 2, 1199, seed=0)).shape == (2, 1200)


# ---- downloaded corpora (opt-in) --------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("FP8COAT_SLOW_TESTS") != "1",
                    reason="downloads Debian packages; FP8COAT_SLOW_TESTS=1")
def test_mix_corpus():
    docs = load_corpus("mix")
    names = [d.name for d in docs]
    assert sum(n.startswith("kjv/") for n in names) == 66 and names[-1] == "kjv/66-Revelation"
    assert any(n.startswith("gcide/") for n in names) and sum(n.startswith("shakespeare/") for n in names) == 42
    assert 48e6 < sum(len(d.text) for d in docs) < 60e6
    assert "In the beginning God created the heaven and the earth." in docs[names.index("kjv/01-Genesis")].text
