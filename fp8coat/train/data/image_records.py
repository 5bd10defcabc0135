"""Image-text records: JSONL files of captions or LLaVA-style conversations, validated up front.

A source is a ``.jsonl`` file, or a folder holding ``data.jsonl`` (else every ``*.jsonl`` directly in it, sorted by
name). Each non-blank line is one record, either a caption::

    {"image": "images/00012.png", "text": "two red circles on the left"}

or a conversation (LLaVA's format; roles ``human``/``user``, ``gpt``/``assistant``, and ``system`` first)::

    {"image": "cats/1.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                              {"from": "gpt", "value": "A red square."}]}

Other keys (``"id"``, ...) are ignored. A relative ``image`` path is relative to the folder of the JSONL file. Every
record holds exactly one image: ``<image>`` may appear at most once, in the first human turn; where it is absent
``"<image>\\n"`` is put in front of the first human turn (LLaVA's convention). A conversation is an optional system
turn, then human and assistant turns alternating, starting with a human one, with at least one assistant turn.

:func:`load_image_records` checks every record before returning: valid JSON, an existing image that PIL can read
(header and checksums, ``Image.verify``), a non-empty caption or well-formed conversation. A bad record raises
``ValueError`` naming ``file:line`` and what is wrong (``FileNotFoundError`` for a missing image or source).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE", "ImageTextRecord", "jsonl_files", "load_image_records", "record_texts", "records_sha256"]

IMAGE = "<image>"  # the image placeholder of the record format (replaced by each model's own, see chat_format)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ImageTextRecord:
    """One validated record.

    ``image``: absolute path. ``turns``: ``((role, text), ...)`` with role ``"system"`` | ``"user"`` |
    ``"assistant"``; a caption record is ``(("user", "<image>"), ("assistant", caption))`` with ``caption=True``.
    The first user turn holds ``<image>`` exactly once; no other turn holds it. ``where``: ``"file:line"``.
    """

    image: Path
    turns: tuple[tuple[str, str], ...]
    caption: bool
    where: str


def jsonl_files(path: str | os.PathLike) -> list[Path]:
    """The JSONL files of a source path: the file itself, or a folder's ``data.jsonl`` (else its ``*.jsonl``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image-text source {os.fspath(path)!r} is neither 'synthetic', 'digits' nor an "
                                "existing JSONL file or folder")
    if path.is_file():
        return [path]
    if (path / "data.jsonl").is_file():
        return [path / "data.jsonl"]
    files = sorted(p for p in path.glob("*.jsonl") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no data.jsonl or *.jsonl file found in {path}")
    return files


def load_image_records(path: str | os.PathLike) -> list[ImageTextRecord]:
    """Every record of the JSONL file or folder ``path``, in file and line order, all validated (see the module
    docstring); ``ValueError`` if there are none."""
    records: list[ImageTextRecord] = []
    for file in jsonl_files(path):
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_parse(line, file, number))
    if not records:
        raise ValueError(f"no records in {', '.join(map(str, jsonl_files(path)))}")
    return records


def _parse(line: str, file: Path, number: int) -> ImageTextRecord:
    where = f"{file}:{number}"
    try:
        raw = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    image = _image_path(raw, file, where)
    if ("text" in raw) == ("conversations" in raw):
        raise ValueError(f"{where}: a record needs either \"text\" (a caption) or \"conversations\", not "
                         f"{'both' if 'text' in raw else 'neither'}")
    if "text" in raw:
        text = raw["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: \"text\" must be a non-empty string, got {json.dumps(text)[:80]}")
        if IMAGE in text:
            raise ValueError(f"{where}: a caption must not contain {IMAGE}")
        return ImageTextRecord(image, (("user", IMAGE), ("assistant", text)), True, where)
    return ImageTextRecord(image, _turns(raw["conversations"], where), False, where)


def _image_path(raw: dict, file: Path, where: str) -> Path:
    name = raw.get("image")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: \"image\" must be a path (a non-empty string), got {json.dumps(name)[:80]}")
    path = Path(name).expanduser()
    path = path if path.is_absolute() else file.parent / path
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {name!r} not found (looked at {path})")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: image {name!r} cannot be read ({type(err).__name__}: {err})") from None
    return path.resolve()


def _turns(conversation, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: \"conversations\" must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {i} must be an object with \"from\" and a string \"value\"")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"{where}: turn {i} is from {json.dumps(turn.get('from'))}; expected one of "
                             f"{', '.join(_ROLES)}")
        turns.append((role, turn["value"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    if not any(role == "assistant" for role, _ in body):
        raise ValueError(f"{where}: the conversation has no assistant (\"gpt\") turn: nothing to learn")
    for i, (role, text) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"{where}: turn {i + len(turns) - len(body)} is {role!r} where {expected!r} was expected "
                             "(an optional system turn, then human and assistant turns alternating)")
        if role == "assistant" and not text.strip():
            raise ValueError(f"{where}: assistant turn {i + len(turns) - len(body)} is empty")
    first_user = len(turns) - len(body)
    count = sum(text.count(IMAGE) for _, text in turns)
    if count > 1 or (count == 1 and IMAGE not in turns[first_user][1]):
        raise ValueError(f"{where}: {IMAGE} must appear at most once, in the first human turn (a record holds one "
                         f"image); found {count}")
    if count == 0:
        turns[first_user] = ("user", f"{IMAGE}\n{turns[first_user][1]}")
    return tuple(turns)


def record_texts(records: Sequence[ImageTextRecord]) -> list[str]:
    """The text of every turn of every record without ``<image>`` (e.g. to train a tokenizer on)."""
    return [text.replace(IMAGE, "").strip() for r in records for _, text in r.turns if text.replace(IMAGE, "").strip()]


def records_sha256(records: Sequence[ImageTextRecord]) -> str:
    """Hex sha256 (16 digits) of the records' image paths and file sizes, turns and kinds: it changes when the data
    may have (an image rewritten with the same size is not noticed)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([str(r.image), r.image.stat().st_size, r.turns, r.caption]).encode())
    return digest.hexdigest()[:16]
