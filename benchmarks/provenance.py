"""Where a result comes from: the UTC date, the commit and the command, recorded in every result file as ``meta``
and shown by ``benchmarks.report`` in each table row."""

from __future__ import annotations

import datetime
import importlib
import os
import shlex
import subprocess
import sys


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def commit() -> str | None:
    """``FP8COAT_COMMIT`` if set (a machine whose copy of the repository has no git history), else
    ``git rev-parse --short HEAD``; None when neither is available."""
    found = os.environ.get("FP8COAT_COMMIT") or None
    if found is None:
        try:
            found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   timeout=10, check=True).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            found = None
    return found


def gpu_name() -> str | None:
    """The name of the CUDA device the benchmark runs on; None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def run_meta(module: str, argv: list[str] | None = None) -> dict:
    """``{"date", "commit", "command"}`` of a benchmark run as ``python -m <module> <argv>`` (default: this
    process's arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"date": utc_now(), "commit": commit(), "command": shlex.join(["python", "-m", module, *args])}


def package_versions() -> dict:
    """The versions of torch, transformers, Python, triton and torchao (``absent (<error>)`` for a package that does
    not import)."""
    meta = {"python": sys.version.split()[0]}
    for mod in ("torch", "transformers", "triton", "torchao"):
        try:
            meta[mod] = importlib.import_module(mod).__version__
        except Exception as ex:  # noqa: BLE001 - a missing or broken package is recorded, not raised
            meta[mod] = f"absent ({type(ex).__name__})"
    return meta
