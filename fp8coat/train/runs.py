"""The run folder (``--out-dir``) across invocations: runs never mix, and ``--resume`` continues one run with the
configuration it was started with.

* A new run gets a run id, written into ``config.json`` and into every checkpoint's ``state.json``; a resume
  refuses a checkpoint of another run.
* A new run refuses a folder that holds a run (``config.json``, ``metrics.jsonl``, ``summary.json`` or
  checkpoints) unless told to overwrite it, which deletes those files first.
* ``--resume`` takes the run's saved configuration (``config.json``; without one, the newest checkpoint's); of the
  options given again, only :data:`MAY_CHANGE_ON_RESUME` may differ from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

from .checkpoint import DamagedCheckpoint, checkpoint_steps, read_state
from .config import TrainConfig

__all__ = ["MAY_CHANGE_ON_RESUME", "RUN_FILES", "new_run_id", "check_new_run", "clear_run", "read_run",
           "write_run", "saved_config", "resumed_config", "config_conflicts", "check_same_run"]

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")
# where and how the run continues, not what it trains (--steps extends it; the cosine decay spans the new total)
MAY_CHANGE_ON_RESUME = ("out_dir", "steps", "eval_every", "save_every", "log_every", "keep_last", "device", "compile")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _present(out_dir: str) -> "list[str]":
    found = []
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
            found.append(name + ("/" if os.path.isdir(path) else ""))
    return found


def check_new_run(out_dir: str, overwrite: bool) -> None:
    """ValueError if ``out_dir`` holds a run and ``overwrite`` is off."""
    found = _present(out_dir)
    if found and not overwrite:
        raise ValueError(f"--out-dir {out_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
                         "or replace it with --overwrite (which deletes those files first)")


def clear_run(out_dir: str) -> None:
    """Delete a run's files from ``out_dir`` (other files stay)."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def read_run(out_dir: str) -> "dict | None":
    """The run's ``config.json`` (configuration plus ``run_id``), None if there is none."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable: {err}") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} is not a run configuration")
    return run


def write_run(out_dir: str, cfg: TrainConfig, run_id: str) -> None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"run_id": run_id, **cfg.to_dict()}, f, indent=1)


def saved_config(out_dir: str) -> dict:
    """The configuration of the run in ``out_dir``: its ``config.json``, else the newest readable checkpoint's."""
    run = read_run(out_dir)
    if run is not None:
        return run
    for _, path in reversed(checkpoint_steps(out_dir)):
        try:
            return read_state(path)["config"]
        except (DamagedCheckpoint, KeyError):
            continue
    raise FileNotFoundError(f"--resume: no run to resume in {out_dir} (no config.json and no checkpoint)")


def config_conflicts(saved: dict, given: dict) -> "list[str]":
    """``--flag value (the run has value)`` for each option in ``given`` that differs from ``saved`` and may not
    change on resume."""
    base = TrainConfig.from_dict(saved)
    return [f"--{name.replace('_', '-')} {value} (the run has {getattr(base, name)})"
            for name, value in given.items()
            if name not in MAY_CHANGE_ON_RESUME and name in TrainConfig.__dataclass_fields__
            and value != getattr(base, name)]


def resumed_config(saved: dict, given: dict, out_dir: str) -> TrainConfig:
    """The run's ``saved`` configuration with the options in ``given`` that may change on resume; ValueError naming
    every other option of ``given`` that differs from the run."""
    conflicts = config_conflicts(saved, given)
    if conflicts:
        allowed = ", ".join("--" + n.replace("_", "-") for n in MAY_CHANGE_ON_RESUME if n != "out_dir")
        raise ValueError(f"--resume continues the run in {out_dir} with its saved configuration, which these flags "
                         f"would change: {'; '.join(conflicts)}. On resume only {allowed} may change: drop the "
                         "others, or start a new run (another --out-dir, or --overwrite)")
    changes = {k: v for k, v in given.items() if k in MAY_CHANGE_ON_RESUME}
    return dataclasses.replace(TrainConfig.from_dict(saved), **{**changes, "out_dir": out_dir})


def check_same_run(run_id: "str | None", state: dict, path: str, out_dir: str) -> None:
    """ValueError if checkpoint ``path`` (its ``state``) belongs to another run than ``run_id``."""
    theirs = state.get("run_id")
    if run_id and theirs and theirs != run_id:
        raise ValueError(f"checkpoint {path} belongs to another run (run id {theirs}; {out_dir}/config.json has "
                         f"{run_id}): remove it, or resume that run from its own folder")
