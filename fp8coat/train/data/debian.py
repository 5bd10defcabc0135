"""Texts from Debian packages, fetched with ``apt-get download`` and read with ``dpkg-deb --fsys-tarfile``.

Nothing is installed system-wide: the ``.deb`` files go to a temporary folder, the wanted members are read from
the package's data archive as a stream, and only the resulting text is kept (by :mod:`fp8coat.train.data.corpus`).

- ``gcide``: ``dict-gcide``, the GNU Collaborative International Dictionary of English (Webster's 1913 + WordNet,
  GPL), ``/usr/share/dictd/gcide.dict.dz`` (dictzip = gzip), 40 MB of plain text cut into ~1 MB parts at entry
  boundaries;
- ``kjv``: the King James Bible (public domain), one document per book (66), 4.3 MB. The text ships in
  ``bible-kjv-text`` as ``/usr/lib/bible.data``, a compressed format that only the ``bible`` program of
  ``bible-kjv`` decodes; that program is run from the extracted package (it needs ``libreadline8``, present on
  standard Debian/Ubuntu systems), so it is not installed either;
- ``linux-doc``: ``linux-doc-6.1`` (GPL), every ``Documentation/**/*.rst.gz``, one document per file, 24 MB.
  Installing this package would upgrade system packages; it is only downloaded (37 MB) and read.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["deb_files", "download_deb", "gcide_documents", "kjv_documents", "linux_doc_documents"]

GCIDE_PART_CHARS = 1_000_000
LINUX_DOC_PACKAGE = "linux-doc-6.1"


def _tail(text: str, n: int = 1500) -> str:
    return text.strip()[-n:] or "(no output)"


def download_deb(package: str, dest: str | os.PathLike) -> Path:
    """``apt-get download package`` into ``dest``; returns the ``.deb`` path (``<package>_<version>_<arch>.deb``)."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"could not download {package} via apt-get: apt-get is not available on this system "
                           "(the corpus needs a Debian or Ubuntu system; pass text files or folders instead)")
    cmd = ["apt-get", "download", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-o", "APT::Sandbox::User=root"]  # the _apt user cannot write into a root-owned temp folder
    proc = subprocess.run(cmd + [package], cwd=dest, capture_output=True, text=True, check=False)
    debs = sorted(Path(dest).glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise RuntimeError(f"could not download {package} via apt-get: {_tail(proc.stderr + proc.stdout)}")
    return debs[0]


def deb_version(deb: Path) -> str:
    """``dict-gcide_0.48.5+nmu2_all.deb`` -> ``dict-gcide 0.48.5+nmu2``."""
    parts = deb.name.split("_")
    return f"{parts[0]} {parts[1].replace('%3a', ':')}" if len(parts) >= 3 else deb.stem


def deb_files(deb: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """``{member path: bytes}`` of the regular files of the package's data archive whose path ``want`` accepts."""
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"cannot read {deb.name}: dpkg-deb is not available on this system")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and want(member.name):
                    out[member.name] = tar.extractfile(member).read()
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"dpkg-deb could not read {deb.name}: {_tail(stderr)}")
    return out


def _split_entries(text: str, part_chars: int) -> list[str]:
    """Cut ``text`` into parts of about ``part_chars`` at blank lines followed by an unindented line."""
    boundary = re.compile(r"\n\n(?=\S)")
    parts, start = [], 0
    while start < len(text):
        m = boundary.search(text, start + part_chars)
        end = m.end() if m else len(text)
        parts.append(text[start:end])
        start = end
    return parts


def gcide_documents() -> tuple[list[tuple[str, str]], str]:
    """``([(name, text), ...], origin)``: the dictionary in ~1 MB parts named ``gcide/NN-<first headword>``."""
    with tempfile.TemporaryDirectory() as tmp:
        deb = download_deb("dict-gcide", tmp)
        files = deb_files(deb, lambda name: name.endswith("/gcide.dict.dz"))
        origin = deb_version(deb)
    if not files:
        raise RuntimeError(f"{origin} holds no gcide.dict.dz")
    text = gzip.decompress(next(iter(files.values()))).decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n").strip() + "\n"
    docs = []
    for i, part in enumerate(_split_entries(text, GCIDE_PART_CHARS)):
        head = re.sub(r"[^A-Za-z0-9]", "", part.split(maxsplit=1)[0])[:24] if part.strip() else ""
        docs.append((f"gcide/{i:02d}-{head}", part))
    return docs, origin


def _run_bible(root: Path) -> str:
    binary = root / "usr" / "bin" / "bible"
    data_dir = root / "usr" / "lib"
    # -l: line limit (large: one verse per line); -p: where bible.data is; the range is the whole Bible.
    cmd = [str(binary), "-l", "100000", "-p", str(data_dir), "gen1:1-rev22:21"]
    try:
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=300, check=False)
    except OSError as e:
        raise RuntimeError(f"could not run the bible program extracted from bible-kjv ({e}); "
                           "it needs libreadline8 (apt-get install libreadline8)") from e
    if proc.returncode != 0 or len(proc.stdout) < 1_000_000:
        raise RuntimeError(f"the bible program of bible-kjv failed (exit {proc.returncode}): "
                           f"{_tail(proc.stderr.decode(errors='replace'))}")
    return proc.stdout.decode("utf-8", errors="replace")


def _split_books(text: str) -> list[tuple[str, str]]:
    """The ``bible`` output prints ``<Book> <chapter>`` between blank lines; one document per book."""
    header = re.compile(r"^(\S.*?) (\d+)$")
    books: list[tuple[str, list[str]]] = []
    lines = text.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        m = header.match(line)
        is_header = m and (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())
        if is_header and (not books or books[-1][0] != m.group(1)):
            books.append((m.group(1), []))
        if books:
            books[-1][1].append(line)
    return [(f"kjv/{i + 1:02d}-{name.replace(' ', '_')}", "\n".join(body).strip() + "\n")
            for i, (name, body) in enumerate(books)]


def kjv_documents() -> tuple[list[tuple[str, str]], str]:
    """``([(name, text), ...], origin)``: one document per book, ``kjv/01-Genesis`` ... ``kjv/66-Revelation``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        origins = []
        for package in ("bible-kjv", "bible-kjv-text"):
            deb = download_deb(package, tmp)
            origins.append(deb_version(deb))
            wanted = deb_files(deb, lambda name: name.endswith(("/usr/bin/bible", "/usr/lib/bible.data",
                                                                 "/usr/lib/bible.data.conc")))
            for name, data in wanted.items():
                target = tmp / "root" / name.lstrip("./")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                if name.endswith("/bible"):
                    target.chmod(0o755)
        text = _run_bible(tmp / "root")
    docs = _split_books(text)
    if len(docs) != 66:
        raise RuntimeError(f"expected 66 books in the output of the bible program, found {len(docs)}")
    return docs, " + ".join(origins)


def linux_doc_documents() -> tuple[list[tuple[str, str]], str]:
    """``([(name, text), ...], origin)``: one document per ``Documentation/**/*.rst``, sorted by path."""
    marker = "/Documentation/"
    with tempfile.TemporaryDirectory() as tmp:
        deb = download_deb(LINUX_DOC_PACKAGE, tmp)
        files = deb_files(deb, lambda name: marker in name and name.endswith(".rst.gz"))
        origin = deb_version(deb)
    docs = []
    for name in sorted(files):
        text = gzip.decompress(files[name]).decode("utf-8", errors="replace").replace("\r\n", "\n")
        if text.strip():
            docs.append(("linux-doc/" + name.split(marker, 1)[1][: -len(".gz")], text))
    if not docs:
        raise RuntimeError(f"{origin} holds no Documentation/**/*.rst.gz files")
    return docs, origin
