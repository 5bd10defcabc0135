"""The library apart from the training application.

The library is ``fp8coat`` and its modules outside ``fp8coat.train``: it needs torch and numpy (triton optionally),
imports nothing of the application and downloads nothing. ``fp8coat.train`` is the application behind the
``fp8coat`` command (corpus downloads, tokenizers, the training loop, the command line); it alone runs programs.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fp8coat

PACKAGE = Path(fp8coat.__file__).parent
REPO = PACKAGE.parent
APP = PACKAGE / "train"
ENTRY_POINT = PACKAGE / "__main__.py"  # ``python -m fp8coat``: runs the application's command line
TRAIN_EXTRA = ("transformers", "tokenizers", "safetensors", "matplotlib")
DOWNLOADS = ("subprocess", "urllib", "apt-get")  # what no library source may mention


def _sources(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _library_sources() -> list[Path]:
    return [p for p in _sources(PACKAGE) if APP not in p.parents and p != ENTRY_POINT]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture(scope="module")
def library_import():
    """Import every library module in a fresh interpreter in which the ``train`` extra cannot be imported;
    ``{"failed": {module: error}, "application": [fp8coat.train modules loaded]}``."""
    modules = [_module_name(p) for p in _library_sources()]
    script = (
        "import importlib, json, sys\n"
        f"sys.modules.update(dict.fromkeys({list(TRAIN_EXTRA)!r}))  # None: importing them raises ImportError\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:\n"
        "        failed[name] = repr(err)\n"
        "app = sorted(m for m in sys.modules if m == 'fp8coat.train' or m.startswith('fp8coat.train.'))\n"
        "print(json.dumps({'failed': failed, 'application': app}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_library_walk_covers_its_packages():
    names = {_module_name(p) for p in _library_sources()}
    assert {"fp8coat", "fp8coat.formats", "fp8coat.conversion", "fp8coat.optim", "fp8coat.memory",
            "fp8coat.ops.linear", "fp8coat.quantization"} <= names
    assert not any(n == "fp8coat.train" or n.startswith("fp8coat.train.") for n in names)


def test_importing_the_library_imports_none_of_the_application(library_import):
    assert library_import["application"] == []


def test_the_library_imports_without_the_train_extra(library_import):
    assert library_import["failed"] == {}


def test_no_library_source_mentions_downloads_or_programs():
    found = [(str(p.relative_to(REPO)), word) for p in _library_sources() for word in DOWNLOADS
             if word in p.read_text(encoding="utf-8")]
    assert found == []


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_application_runs_programs():
    running = {p for p in _sources(PACKAGE) if "subprocess" in _imported_modules(p)}
    assert running, "the corpus downloads run apt-get, dpkg-deb and pip"
    assert all(APP in p.parents for p in running), sorted(str(p) for p in running)


def test_the_command_is_the_application():
    tomllib = pytest.importorskip("tomllib")
    with open(REPO / "pyproject.toml", "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["fp8coat"]
    module, _, attr = target.partition(":")
    assert module.startswith("fp8coat.train.")
    assert callable(getattr(importlib.import_module(module), attr))
