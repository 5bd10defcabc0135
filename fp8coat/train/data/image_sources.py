"""Image-text sources by name or path: ``synthetic``, ``synthetic:N``, ``digits``, or a JSONL file / folder.

``synthetic`` is :func:`fp8coat.train.data.synthetic_images.synthetic_dataset` with its defaults (4000 scenes of
64 × 64 pixels, content seed 0), ``synthetic:N`` the same with ``N`` scenes; ``digits`` is scikit-learn's digits
(:func:`~fp8coat.train.data.synthetic_images.digits_dataset`). Both are written once under ``<cache>/images/`` and
then read like any folder (:func:`fp8coat.train.data.image_records.load_image_records`). A name always means the
bundled data: write ``./digits`` for a folder of that name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .image_records import ImageTextRecord, load_image_records
from .synthetic_images import digits_dataset, synthetic_dataset

__all__ = ["IMAGE_SOURCES", "describe_image_source", "image_source_folder", "load_image_text"]

IMAGE_SOURCES = ("synthetic", "synthetic:N", "digits")


def image_source_folder(source: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The JSONL file or folder that ``source`` names (bundled data is written first if needed)."""
    if isinstance(source, str) and source == "digits":
        return digits_dataset(cache)
    if isinstance(source, str) and (source == "synthetic" or source.startswith("synthetic:")):
        if source == "synthetic":
            return synthetic_dataset(cache=cache)
        count = source.partition(":")[2]
        if not count.isdigit() or int(count) < 2:
            raise ValueError(f"image-text source {source!r}: expected synthetic:N with a whole number N >= 2")
        return synthetic_dataset(int(count), cache=cache)
    return Path(source).expanduser()


def load_image_text(source: str | os.PathLike, cache: str | os.PathLike | None = None) -> list[ImageTextRecord]:
    """The validated records of ``source`` (see the module docstring)."""
    return load_image_records(image_source_folder(source, cache))


def describe_image_source(source: str | os.PathLike) -> str:
    """Human-readable: ``"synthetic (4000 rendered shape scenes)"``, ``"digits (scikit-learn)"``, or the path."""
    if source == "synthetic":
        return "synthetic (4000 rendered shape scenes)"
    if isinstance(source, str) and source.startswith("synthetic:"):
        return f"synthetic ({source.partition(':')[2]} rendered shape scenes)"
    if source == "digits":
        return "digits (scikit-learn)"
    return os.fspath(source)
