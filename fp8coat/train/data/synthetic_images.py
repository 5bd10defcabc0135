"""Bundled image-caption data: rendered scenes of coloured shapes, and scikit-learn's handwritten digits.

Synthetic scenes (:func:`synthetic_scene`): on a white ``size × size`` canvas, ``count`` (1-4) equal shapes
(circle, square, triangle) of one colour (red, green, blue, yellow, purple, orange) inside one region of the image
(left / right / top / bottom half, or the center square), captioned ``"two red circles on the left"``. The
region is cut into 2 × 2 cells; each shape takes its own cell (random side 55-90 % of the cell, random place in it,
at least one pixel from the cell's border), so shapes never touch. Drawn without anti-aliasing: every pixel is the
background or the exact colour. Scene ``i`` depends only on ``(seed, i)``.

Digits (:func:`digits_dataset`): the 1797 8 × 8 images of ``sklearn.datasets.load_digits`` as grey PNGs (dark ink
on white, 16 levels scaled to 0-255), captioned ``"the digit seven"``; only when scikit-learn is installed.

Both are written once as an image-text folder (the format of :mod:`fp8coat.train.data.image_records`) and cached::

    <cache>/images/synthetic-n<N>-s<size>-seed<seed>-v<format>/   data.jsonl, images/00000.png ..., manifest.json
    <cache>/images/digits-<sha256 of the arrays>-v<format>/        the same layout

written atomically (complete or absent). ``data.jsonl`` lines carry the scene too (``shape``, ``colour``,
``count``, ``position``; ``digit``), which the loader ignores.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._atomic import atomic_dir, sha256_of_files
from .corpus import cache_dir

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DIGIT_WORDS",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "caption_of",
    "digits_dataset",
    "region",
    "render_scene",
    "synthetic_dataset",
    "synthetic_scene",
]

IMAGES_FORMAT = 1
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (150, 60, 190), "orange": (245, 140, 30)}
BACKGROUND = (255, 255, 255)
POSITIONS = ("left", "right", "top", "bottom", "center")
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
_COUNTS = ("one", "two", "three", "four")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Scene:
    """What an image shows: ``boxes`` are the shapes' inclusive pixel boxes ``(x0, y0, x1, y1)``."""

    shape: str
    colour: str
    count: int
    position: str
    boxes: tuple[tuple[int, int, int, int], ...]


def region(position: str, size: int) -> tuple[int, int, int, int]:
    """The pixel rectangle ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of ``position`` on a ``size × size`` canvas."""
    h = size // 2
    q = size // 4
    return {"left": (0, 0, h, size), "right": (h, 0, size, size), "top": (0, 0, size, h),
            "bottom": (0, h, size, size), "center": (q, q, size - q, size - q)}[position]


def caption_of(shape: str, colour: str, count: int, position: str) -> str:
    """``"two red circles on the left"``."""
    return f"{_COUNTS[count - 1]} {colour} {shape}{'s' if count > 1 else ''} {_WHERE[position]}"


def _random_scene(rng: np.random.Generator, size: int) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    count = int(rng.integers(1, 5))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    x0, y0, x1, y1 = region(position, size)
    cw, ch = (x1 - x0) // 2, (y1 - y0) // 2
    boxes = []
    for cell in sorted(rng.choice(4, size=count, replace=False)):
        cx, cy = x0 + (cell % 2) * cw + 1, y0 + (cell // 2) * ch + 1  # inside the cell, 1 px from its border
        room = min(cw, ch) - 2
        side = max(3, int(round(room * rng.uniform(0.55, 0.9))))
        ox = cx + int(rng.integers(0, cw - 2 - side + 1))
        oy = cy + int(rng.integers(0, ch - 2 - side + 1))
        boxes.append((ox, oy, ox + side - 1, oy + side - 1))
    return Scene(shape, colour, count, position, tuple(boxes))


def render_scene(scene: Scene, size: int) -> Image.Image:
    """The RGB ``size × size`` image of ``scene`` (no anti-aliasing)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for x0, y0, x1, y1 in scene.boxes:
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def synthetic_scene(index: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, str, Scene]:
    """Scene ``index`` of ``seed``: ``(image, caption, scene)``; depends only on ``(seed, index, size)``."""
    if size < 32:
        raise ValueError(f"synthetic images need a size of at least 32 pixels, got {size}")
    scene = _random_scene(np.random.default_rng([int(seed), int(index)]), size)
    return render_scene(scene, size), caption_of(scene.shape, scene.colour, scene.count, scene.position), scene


def _write_folder(folder: Path, items, manifest: dict) -> None:
    """Write ``items`` (``(image, record dict without "image")``) as ``images/NNNNN.png`` + ``data.jsonl``."""
    (folder / "images").mkdir()
    with (folder / "data.jsonl").open("w", encoding="utf-8") as f:
        for i, (image, record) in enumerate(items):
            name = f"images/{i:05d}.png"
            image.save(folder / name, format="PNG")
            f.write(json.dumps({"image": name, **record}) + "\n")
    manifest = {**manifest, "format": IMAGES_FORMAT, "data_sha256": sha256_of_files(folder / "data.jsonl")[:16]}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def synthetic_dataset(n: int = 4000, seed: int = 0, size: int = 64, cache: str | os.PathLike | None = None) -> Path:
    """The folder of scenes ``0 .. n-1`` of ``seed`` (written on first use, then reused; see the module docstring)."""
    if n < 2:
        raise ValueError(f"a synthetic dataset needs at least 2 images, got {n}")
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / "images" / f"synthetic-n{n}-s{size}-seed{seed}-v{IMAGES_FORMAT}"
    if not (folder / "manifest.json").is_file():
        def items():
            for i in range(n):
                image, caption, scene = synthetic_scene(i, seed, size)
                yield image, {"text": caption, "shape": scene.shape, "colour": scene.colour, "count": scene.count,
                              "position": scene.position}
        with atomic_dir(folder) as tmp:
            _write_folder(tmp, items(), {"kind": "synthetic", "n": n, "seed": seed, "size": size})
    return folder


def digits_dataset(cache: str | os.PathLike | None = None) -> Path:
    """The folder of scikit-learn's digits (written on first use); ``ModuleNotFoundError`` saying so when
    scikit-learn is not installed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError("the 'digits' images are scikit-learn's (sklearn.datasets.load_digits), and "
                                  "scikit-learn is not installed: pip install scikit-learn, or use 'synthetic' "
                                  "or a folder of your own") from None
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    targets = np.asarray(digits.target, dtype=np.int64)
    if images.ndim != 3 or len(images) != len(targets) or len(images) < 2:
        raise ValueError(f"load_digits returned images of shape {images.shape} and {len(targets)} targets")
    key = hashlib.sha256(images.tobytes() + targets.tobytes()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / "images" / f"digits-{key}-v{IMAGES_FORMAT}"
    if not (folder / "manifest.json").is_file():
        pixels = np.clip(np.rint(255 - images * (255 / 16)), 0, 255).astype(np.uint8)
        items = ((Image.fromarray(p), {"text": f"the digit {DIGIT_WORDS[t]}", "digit": int(t)})
                 for p, t in zip(pixels, targets))
        with atomic_dir(folder) as tmp:
            _write_folder(tmp, items, {"kind": "digits", "n": len(images), "origin": "sklearn.datasets.load_digits"})
    return folder
