"""The run folder (``--out-dir``) across invocations: runs never mix, and ``--resume`` continues one run with the
configuration it was started with.

* A new run gets a run id, written into ``config.json`` and into every checkpoint's ``state.json``; a resume
  refuses a checkpoint of another run.
* A new run refuses a folder that holds a run (``config.json``, ``metrics.jsonl``, ``summary.json`` or
  checkpoints) unless told to overwrite it, which deletes those files first.
* ``--resume`` takes the run's saved configuration (``config.json``; without one, the newest checkpoint's); of the
  options given again, only :data:`MAY_CHANGE_ON_RESUME` may differ from it.
* ``config.json`` and every checkpoint's ``state.json`` record the identity of the prepared training data
  (:func:`data_identity`); a resume on other data is refused (:func:`check_same_data`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

from .checkpoint import DamagedCheckpoint, checkpoint_steps, read_state
from .config import TrainConfig
from .data._atomic import sha256_of_files

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "RUN_FILES",
    "check_new_run",
    "check_same_data",
    "check_same_run",
    "clear_run",
    "config_differences",
    "data_identity",
    "new_run_id",
    "read_run",
    "resumed_config",
    "saved_config",
    "write_run",
]

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")
# where and how the run continues, not what it trains (--steps extends it; the cosine decay spans the new total)
MAY_CHANGE_ON_RESUME = ("out_dir", "steps", "eval_every", "save_every", "log_every", "keep_last", "device", "compile",
                        "fsdp", "fp8_all_gather", "cache_fp8_weights",
                        "activation_checkpointing", "caption_eval", "data_workers")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _present(out_dir: str) -> list[str]:
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


def read_run(out_dir: str) -> dict | None:
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
        raise ValueError(f"{path} is not a run configuration")  # noqa: TRY004 -- a bad file: a usage error
    return run


def write_run(out_dir: str, cfg: TrainConfig, run_id: str, data: dict | None = None) -> None:
    """Write ``config.json``: the run id, the identity of its training data (:func:`data_identity`) and the
    configuration."""
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"run_id": run_id, "data_identity": data, **cfg.to_dict()}, f, indent=1)


def saved_config(out_dir: str) -> tuple[dict, str]:
    """The configuration of the run in ``out_dir`` and the file it was read from: its ``config.json``, else the
    newest readable checkpoint's ``state.json``."""
    run = read_run(out_dir)
    if run is not None:
        return run, os.path.join(out_dir, "config.json")
    for _, path in reversed(checkpoint_steps(out_dir)):
        try:
            return read_state(path)["config"], os.path.join(path, "state.json")
        except (DamagedCheckpoint, KeyError):
            continue
    raise FileNotFoundError(f"--resume: no run to resume in {out_dir} (no config.json and no checkpoint)")


def config_differences(saved: dict, given: dict, where: str) -> list[tuple[str, object, object]]:
    """``(option, given value, saved value)`` for each option in ``given`` that differs from ``saved`` (read from
    the file ``where``, named in a ValueError for a value of the wrong type) and may not change on resume."""
    base = TrainConfig.from_dict(saved, where)
    return [(name, value, getattr(base, name)) for name, value in given.items()
            if name not in MAY_CHANGE_ON_RESUME and name in TrainConfig.__dataclass_fields__
            and value != getattr(base, name)]


def resumed_config(saved: dict, given: dict, out_dir: str, where: str) -> TrainConfig:
    """The run's ``saved`` configuration (read from the file ``where``) with the options in ``given`` that may
    change on resume; ValueError naming every other option of ``given`` that differs from the run, or naming
    ``where`` and the option when a saved value is of the wrong type or out of range."""
    conflicts = [f"--{name.replace('_', '-')} {value} (the run has {theirs})"
                 for name, value, theirs in config_differences(saved, given, where)]
    if conflicts:
        allowed = ", ".join("--" + n.replace("_", "-") for n in MAY_CHANGE_ON_RESUME if n != "out_dir")
        raise ValueError(f"--resume continues the run in {out_dir} with its saved configuration ({where}), which "
                         f"these flags would change: {'; '.join(conflicts)}. On resume only {allowed} may change: "
                         "drop the others, or start a new run (another --out-dir, or --overwrite)")
    changes = {k: v for k, v in given.items() if k in MAY_CHANGE_ON_RESUME}
    if saved.get("recipe") == "bf16" and saved.get("cache_fp8_weights") is True:
        # recorded by every run while the FP8 weight cache was on by default; a BF16 model has no FP8 weights
        saved = {**saved, "cache_fp8_weights": False}
    base = _valid(TrainConfig.from_dict(saved, where), where)
    return dataclasses.replace(base, **{**changes, "out_dir": out_dir})


def _valid(cfg: TrainConfig, where: str) -> TrainConfig:
    """``cfg`` validated; a ValueError names the file ``where`` it was read from."""
    try:
        return cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def check_same_run(run_id: str | None, state: dict, path: str, out_dir: str) -> None:
    """ValueError if checkpoint ``path`` (its ``state``) belongs to another run than ``run_id``."""
    theirs = state.get("run_id")
    if run_id and theirs and theirs != run_id:
        raise ValueError(f"checkpoint {path} belongs to another run (run id {theirs}; {out_dir}/config.json has "
                         f"{run_id}): remove it, or resume that run from its own folder")


# (key, how a message names it) of the identity of the prepared training data
_DATA_FIELDS = (("source", "data"), ("tokenizer", "tokenizer.json sha256"), ("train_tokens", "training tokens"),
                ("val_tokens", "validation tokens"), ("tokens_sha256", "token files' sha256"),
                ("records_sha256", "image-text records' sha256"), ("train_records", "training records"),
                ("val_records", "validation records"))


def data_identity(data) -> dict:
    """What identifies the prepared training data (a :class:`~fp8coat.train.data.PreparedData`): its description, the
    sha256 of its tokenizer (``"bytes"`` for the byte tokenizer), the training and validation token counts and the
    sha256 of the two token files (16 hex digits each; the latter as the dataset's manifest records it, computed
    here for datasets prepared without it)."""
    tokens = data.tokens_sha256 or sha256_of_files(data.train_path, data.val_path)[:16]
    return {"source": data.source,
            "tokenizer": sha256_of_files(data.tokenizer_path)[:16] if data.tokenizer_path is not None else "bytes",
            "train_tokens": data.n_train_tokens, "val_tokens": data.n_val_tokens, "tokens_sha256": tokens}


def check_same_data(recorded: dict, current: dict, where: str) -> None:
    """ValueError naming every part of the data identity ``current`` that differs from ``recorded`` (read from
    the file ``where``)."""
    changes = [f"{label} {current.get(key)} (the run started with {recorded.get(key)})"
               for key, label in _DATA_FIELDS if current.get(key) != recorded.get(key)]
    if changes:
        raise ValueError(f"--resume: the training data is not the data the run started with (recorded in {where}): "
                         f"{'; '.join(changes)}. Restore the data the run started with, or start a new run on "
                         "this data (another --out-dir, or --overwrite)")
