"""Atomic writes into the cache: a file or a folder appears complete under its final name, or not at all.

Everything is first written to a hidden sibling (``.<name>.partial-<pid>-<random>``) and then renamed into place;
on any failure (including KeyboardInterrupt) the partial file or folder is removed. Also :func:`sha256_of_files`,
the content hash of written files (dataset and checkpoint manifests).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "atomic_write_text", "sha256_of_files"]


def sha256_of_files(*paths: str | os.PathLike) -> str:
    """Hex sha256 of the files' bytes, read in order in chunks of 1 MiB."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it is renamed to ``path``, else deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on normal exit it becomes ``path``, else it is deleted.

    If ``path`` already exists when the block ends (another process finished first), the existing folder is kept
    and the new one discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` (through :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
