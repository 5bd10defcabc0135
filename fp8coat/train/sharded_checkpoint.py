"""Checkpoints of sharded runs (``--fsdp``): the model and the optimizer through ``torch.distributed.checkpoint``
(DCP), plus the same HF export as a checkpoint of one process.

``<out>/checkpoints/step_000100/`` of a sharded run holds

* ``.metadata`` and one ``__<rank>_0.distcp`` file per rank: the model's and the optimizer's state dicts
  (``get_state_dict(model, optimizer)``: keys are parameter names; the optimizer's states are DTensors with
  their parameter's global shape), which DCP reads back on any number of ranks, sharded or not: a run saved on
  2 ranks resumes on 1 (with or without ``--fsdp``) or on 4;
* the model as an HF checkpoint (``config.json`` + safetensors, from the full state dict gathered on rank 0):
  ``from_pretrained`` loads it, and ``--model`` fine-tunes from it;
* ``state.json``, the tokenizer and ``manifest.json``, as :mod:`fp8coat.train.checkpoint` writes them (rank 0,
  once every rank's files are written; the ``.partial`` folder is renamed when complete).

A checkpoint of a run of one process (HF weights + ``optimizer.pt``) loads into a sharded model too
(:func:`load_into_shards`): every rank reads the whole files and keeps its shards.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..checkpointing import load_sharded, save_sharded
from ..optim import AdamW
from .checkpoint import (
    OPTIMIZER,
    DamagedCheckpoint,
    begin_checkpoint,
    complete_checkpoint,
    read_optimizer_state,
    read_state,
    read_weights,
)
from .distributed import Ranks

__all__ = ["DCP_METADATA", "is_sharded_checkpoint", "load_into_shards", "load_sharded_checkpoint",
           "save_sharded_checkpoint"]

DCP_METADATA = ".metadata"  # DCP's index of the saved tensors


def is_sharded_checkpoint(path: str) -> bool:
    """Whether checkpoint ``path`` was written by a sharded run (holds DCP files)."""
    return os.path.isfile(os.path.join(path, DCP_METADATA))


def save_sharded_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, tokenizer_path: str | None,
                            ranks: Ranks) -> str:
    """Write checkpoint ``step`` of a sharded run (every rank calls this; the model's parameters must be the
    sharded ones, not gathered) and return its folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    tmp = ranks.on_main(lambda: begin_checkpoint(out_dir, step))
    try:
        save_sharded(model, optimizer, tmp)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    except BaseException:
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def finish() -> str:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return complete_checkpoint(out_dir, step, state, tokenizer_path)

    return ranks.on_main(finish)


def load_sharded_checkpoint(path: str, model, optimizer) -> dict:
    """Load sharded checkpoint ``path`` into ``model`` and ``optimizer`` (sharded over any number of ranks, or
    not: every rank calls this) with :func:`fp8coat.load_sharded`; returns its ``state.json``. ValueError naming
    the parameters when the checkpoint's shapes or names do not fit the model (checked before anything is read),
    or naming the checkpoint when DCP fails otherwise; DamagedCheckpoint when its index is unreadable."""
    state = read_state(path)
    _check_readable(path)
    try:
        load_sharded(model, optimizer, path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 -- DCP's errors (CheckpointException, ...) name no file
        raise ValueError(f"checkpoint {path} does not fit the model and optimizer: {type(err).__name__}: "
                         f"{str(err)[:500]}") from None
    return state


def _check_readable(path: str) -> None:
    """DamagedCheckpoint naming the index of DCP checkpoint ``path`` when it cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        FileSystemReader(path).read_metadata()
    except Exception as err:  # noqa: BLE001 -- any failure to parse the file: name it
        raise DamagedCheckpoint(f"{os.path.join(path, DCP_METADATA)} is unreadable: {type(err).__name__}: "
                                f"{str(err)[:200]}") from None


def load_into_shards(path: str, model, optimizer) -> dict:
    """Load checkpoint ``path`` of a run of one process (HF weights and ``optimizer.pt``) into the sharded
    ``model`` and ``optimizer`` (every rank calls this, reads the whole files and keeps its shards); returns its
    ``state.json``. ValueError naming the parameter when the checkpoint's shapes or names do not fit the
    model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = read_state(path)
    weights = read_weights(path)
    _check_fits(path, {name: tuple(t.shape) for name, t in weights.items()}, get_model_state_dict(model), model)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    saved = read_optimizer_state(path)
    try:
        if isinstance(optimizer, AdamW):  # takes each rank's part of whole states itself (FP8 ones included)
            optimizer.load_state_dict(saved)
        else:
            set_optimizer_state_dict(model, optimizer, _keyed_by_name(saved, model, optimizer), options=full)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{os.path.join(path, OPTIMIZER)} does not fit the optimizer: {type(err).__name__}: "
                         f"{err}") from None
    return state


def _keyed_by_name(saved: dict, model, optimizer) -> dict:
    """Optimizer state dict ``saved`` (``Optimizer.state_dict()``: parameters numbered in the order of
    ``optimizer``'s groups) with the parameters named as in ``model`` instead."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(saved["param_groups"]) != len(optimizer.param_groups) or len(saved["state"]) > len(order):
        raise ValueError(f"it holds {len(saved['param_groups'])} parameter groups and {len(saved['state'])} "
                         f"parameters' states, the optimizer {len(optimizer.param_groups)} and {len(order)}")
    return {"state": {order[i]: value for i, value in saved["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in saved["param_groups"]]}


def _check_fits(path: str, saved: dict[str, tuple[int, ...]], model_state: dict[str, torch.Tensor], model) -> None:
    """ValueError naming the first parameter of ``model_state`` whose shape differs from ``saved``'s, or the
    parameters only one of them has (tied weights may be missing from ``saved``)."""
    for name, tensor in model_state.items():
        if name in saved and saved[name] != tuple(tensor.shape):
            raise ValueError(f"checkpoint {path} does not match the model: {name} has shape {list(saved[name])} "
                             f"in the checkpoint and {list(tensor.shape)} in the model")
    tied = getattr(model, "_tied_weights_keys", None) or []
    missing = [n for n in model_state if n not in saved and n not in tied]
    unexpected = [n for n in saved if n not in model_state]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
