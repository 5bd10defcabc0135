"""Checkpoints with exact resume: ``<out>/checkpoints/step_000100/`` holds

* the model as an HF checkpoint (``save_pretrained``: config.json + safetensors; loadable for fine-tuning),
* ``optimizer.pt`` (the optimizer's state dict: FP8 moments, side data, bf16 remainders),
* ``state.json`` (step, run id, config, last metrics, the losses of the last steps) and, when there is one, the
  ``tokenizer.json``,
* ``manifest.json``, written last: the size and sha256 of every other file.

A sharded run (``--fsdp``) writes ``torch.distributed.checkpoint`` files in place of ``optimizer.pt``, next to the
same HF export (:mod:`fp8coat.train.sharded_checkpoint`).

Data order depends only on (seed, step), so model + optimizer + step are the whole training state. A checkpoint
is written to ``step_N.partial`` and renamed when complete: a crash never leaves a half checkpoint under a final
name. Loading checks every file against the manifest first (:func:`verify_checkpoint`); a checkpoint without a
manifest (an older format) cannot be checked and loads with a warning. Checkpoints are removed by renaming them
to ``step_N.deleting`` first, so a crash while deleting never leaves a half checkpoint either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import torch

from .data._atomic import sha256_of_files

__all__ = [
    "MANIFEST",
    "DamagedCheckpoint",
    "begin_checkpoint",
    "checkpoint_steps",
    "complete_checkpoint",
    "latest_checkpoint",
    "latest_intact_checkpoint",
    "load_checkpoint",
    "model_files",
    "prune_checkpoints",
    "read_optimizer_state",
    "read_state",
    "read_weights",
    "remove_leftovers",
    "save_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"  # the model's weights, or with an index the shards it names
INDEX = "model.safetensors.index.json"
OPTIMIZER = "optimizer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+\.(partial|deleting)$")
_HANG = "FP8COAT_TEST_SAVE_HANG"


class DamagedCheckpoint(ValueError):
    """A checkpoint file is missing, truncated, altered or unreadable; the message names the file."""


def save_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, tokenizer_path: str | None,
                    processor=None) -> str:
    """Write checkpoint ``step`` (replacing one of that step) and return its folder; ``processor`` (a
    vision-language model's HF processor) is saved with it (``save_pretrained``: tokenizer, image processor, chat
    template) and the weights are written under the model's own state_dict keys."""
    tmp = begin_checkpoint(out_dir, step)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the run's own progress line readable
        # a VLM's weights under the model's own state_dict keys (HF would write its older key layout, e.g. LLaVA's
        # "language_model.model.*"), which load_checkpoint reads back as they are and from_pretrained also loads
        model.save_pretrained(tmp, safe_serialization=True, save_original_format=processor is None)
        _test_hang(step, "model.safetensors")
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER))
        _test_hang(step, "optimizer.pt")
        if processor is not None:
            processor.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return complete_checkpoint(out_dir, step, state, tokenizer_path)


def begin_checkpoint(out_dir: str, step: int) -> str:
    """The empty ``step_N.partial`` folder that checkpoint ``step`` is written into (a leftover one is replaced)."""
    tmp = _step_dir(out_dir, step) + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def complete_checkpoint(out_dir: str, step: int, state: dict, tokenizer_path: str | None) -> str:
    """Finish checkpoint ``step`` whose model and optimizer files are in its ``.partial`` folder: write
    ``state.json`` (``state`` with the step), the tokenizer and the manifest, then rename the folder to its final
    name (replacing a checkpoint of that step). Returns the final folder; on failure the partial one is
    removed."""
    final = _step_dir(out_dir, step)
    tmp = final + ".partial"
    try:
        _write_json(os.path.join(tmp, "state.json"), {**state, "step": step})
        _test_hang(step, "state.json")
        if tokenizer_path:
            shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
        write_manifest(tmp)
        _test_hang(step, MANIFEST)
        if os.path.exists(final):
            _remove_dir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _test_hang(step, "complete")
    return final


def _step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:06d}")


def _test_hang(step: int, stage: str) -> None:
    """Test hook: with ``FP8COAT_TEST_SAVE_HANG=<step>:<stage>`` the save of checkpoint ``step`` stops for an hour
    after ``stage`` (a file written into the ``.partial`` folder, or ``complete`` after the rename), so that a test
    can kill the run at that point of a save."""
    if os.environ.get(_HANG) == f"{step}:{stage}":
        time.sleep(3600)


def write_manifest(path: str) -> None:
    """Write ``manifest.json`` into checkpoint folder ``path``: the size and sha256 of every other file in it."""
    files = {name: _describe(os.path.join(path, name)) for name in sorted(os.listdir(path))
             if name != MANIFEST and os.path.isfile(os.path.join(path, name))}
    _write_json(os.path.join(path, MANIFEST), {"format": 1, "files": files})


def verify_checkpoint(path: str) -> bool:
    """Check every file of checkpoint ``path`` against its manifest; raises :class:`DamagedCheckpoint` naming the
    first file that is missing or differs in size or content. Returns False for a checkpoint without a manifest
    (nothing to check it against), True otherwise."""
    files = _manifest_files(path)
    if files is None:
        return False
    for name, entry in files.items():
        problem = _file_problem(os.path.join(path, name), entry)
        if problem:
            raise DamagedCheckpoint(problem)
    return True


def _file_problem(file: str, entry: dict) -> str | None:
    if not os.path.isfile(file):
        return f"{file} is missing"
    size = os.path.getsize(file)
    if size != entry.get("bytes"):
        return f"{file} has {size} bytes, the manifest records {entry.get('bytes')} (truncated or overwritten)"
    if _describe(file)["sha256"] != entry.get("sha256"):
        return f"{file} differs from the manifest's sha256 (damaged)"
    return None


def _describe(file: str) -> dict:
    return {"bytes": os.path.getsize(file), "sha256": sha256_of_files(file)}


def checkpoint_steps(out_dir: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of every complete checkpoint under ``<out_dir>/checkpoints``, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d)))


def latest_checkpoint(out_dir: str) -> str | None:
    """The folder of the newest checkpoint (unverified), or None."""
    steps = checkpoint_steps(out_dir)
    return steps[-1][1] if steps else None


def latest_intact_checkpoint(out_dir: str) -> tuple[str | None, list[str]]:
    """The newest checkpoint that passes :func:`verify_checkpoint` and whose ``state.json`` reads (None if there is
    none), and why each newer one was skipped."""
    skipped = []
    for _, path in reversed(checkpoint_steps(out_dir)):
        try:
            verify_checkpoint(path)
            read_state(path)
        except DamagedCheckpoint as err:
            skipped.append(f"{path}: {err}")
            continue
        return path, skipped
    return None, skipped


def read_state(path: str) -> dict:
    """The checkpoint's ``state.json`` (with ``step``); :class:`DamagedCheckpoint` if it does not read."""
    file = os.path.join(path, "state.json")
    state = _read_json(file)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedCheckpoint(f"{file} is not a checkpoint state (no step)")
    return state


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Load the weights (the files :func:`model_files` names) and the optimizer state in place; returns the saved
    ``state.json`` (with ``step``). Raises ValueError (:class:`DamagedCheckpoint` for unreadable files) naming the
    file."""
    state = read_state(path)
    weights = read_weights(path, str(next(model.parameters()).device))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise ValueError(f"checkpoint {path} does not match the model: {err}") from None
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", [])]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    saved = read_optimizer_state(path)
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, IndexError, TypeError, RuntimeError) as err:
        raise ValueError(f"{os.path.join(path, OPTIMIZER)} does not fit the optimizer: {type(err).__name__}: "
                         f"{err}") from None
    return state


def read_weights(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The model weights of checkpoint ``path`` (the files :func:`model_files` names) on ``device``."""
    from safetensors.torch import load_file

    weights = {}
    for f in model_files(path):
        weights.update(_read(os.path.join(path, f), lambda file: load_file(file, device=device)))
    return weights


def read_optimizer_state(path: str) -> dict:
    """The optimizer's state dict saved in checkpoint ``path`` (on the CPU)."""
    return _read(os.path.join(path, OPTIMIZER), lambda f: torch.load(f, map_location="cpu", weights_only=True))


def model_files(path: str) -> list[str]:
    """The weight files of checkpoint ``path``: the shards named by ``model.safetensors.index.json``, else
    ``model.safetensors``; no other file is read as weights. With a manifest, each of them (and the index) must be
    one it lists, else :class:`DamagedCheckpoint`."""
    if os.path.isfile(os.path.join(path, INDEX)):
        files = _shards(os.path.join(path, INDEX))
        used = [INDEX, *files]
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        files = used = [WEIGHTS]
    else:
        raise FileNotFoundError(f"no model weights in checkpoint {path} (neither {WEIGHTS} nor {INDEX})")
    listed = _manifest_files(path)
    unlisted = [name for name in used if listed is not None and name not in listed]
    if unlisted:
        raise DamagedCheckpoint(f"{os.path.join(path, unlisted[0])} is not listed in "
                                f"{os.path.join(path, MANIFEST)}")
    return files


def _shards(index: str) -> list[str]:
    """The file names of the shards an index names; :class:`DamagedCheckpoint` if it is no index."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or not all(isinstance(n, str) and n == os.path.basename(n) for n in names):
        raise DamagedCheckpoint(f"{index} is not a weight index (no weight_map naming files of the checkpoint)")
    return names


def _manifest_files(path: str) -> dict[str, dict] | None:
    """File name -> ``{"bytes", "sha256"}`` as the manifest of checkpoint ``path`` lists them; None without a
    manifest; :class:`DamagedCheckpoint` if it is not one."""
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return None
    content = _read_json(file)
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(e, dict) for e in files.values()):
        raise DamagedCheckpoint(f"{file} is not a checkpoint manifest")
    return files


def _read(file: str, reader):
    if not os.path.isfile(file):
        raise DamagedCheckpoint(f"{file} is missing")
    try:
        return reader(file)
    except Exception as err:  # noqa: BLE001 -- any failure to parse the file: name it
        raise DamagedCheckpoint(f"{file} is unreadable (truncated or damaged?): {type(err).__name__}: "
                                f"{str(err)[:200]}") from None


def _read_json(file: str):
    def parse(f):
        with open(f) as fh:
            return json.load(fh)

    return _read(file, parse)


def _write_json(file: str, data: dict) -> None:
    with open(file, "w") as f:
        json.dump(data, f, indent=1)


def prune_checkpoints(out_dir: str, keep_last: int, up_to_step: int) -> list[str]:
    """Remove all but the newest ``keep_last`` checkpoints of steps <= ``up_to_step`` (``keep_last`` 0: keep all);
    returns the removed folders. Newer ones (skipped as damaged on resume) are left to be overwritten."""
    if keep_last <= 0:
        return []
    doomed = [path for step, path in checkpoint_steps(out_dir) if step <= up_to_step][:-keep_last]
    for path in doomed:
        _remove_dir(path)
    return doomed


def remove_leftovers(out_dir: str) -> None:
    """Remove the ``.partial`` and ``.deleting`` folders a killed run may have left under ``checkpoints/``."""
    root = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(root):
        for d in os.listdir(root):
            if _LEFTOVER.match(d):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _remove_dir(path: str) -> None:
    trash = path + ".deleting"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)
