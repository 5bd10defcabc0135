"""Distributed checkpoints of a model and its :class:`fp8coat.AdamW`: :func:`save_sharded` and :func:`load_sharded`.

Thin wrappers of ``torch.distributed.checkpoint`` (DCP) and its ``get_state_dict`` / ``set_state_dict``: every
rank writes its own shards, and a checkpoint saved on N ranks loads on any number of ranks (FSDP2-sharded or
plain parameters; one process, with or without a process group, or several). The checkpoint holds
``{"model": ..., "optimizer": ...}`` keyed by parameter names; fp8coat.AdamW's states keep their dtypes (FP8
moments, uint8 exponents, fp32 absmax, int16 master remainders), the parameter dtype each state was made for and
the stochastic-rounding position and seed, so a run resumed on the same number of ranks continues bit for bit.

What :func:`load_sharded` adds to ``dcp.load``, from the checkpoint's metadata and before any tensor is read:

* A model parameter whose shape differs from the checkpoint's, that the checkpoint lacks, or (``strict``) a
  parameter of the checkpoint that the model lacks raises a ValueError naming the parameters (DCP's own error,
  where it gives one, comes wrapped in every rank's traceback, and DCP skips unknown names silently).
* Optimizer states are read with the dtype and shape they were saved with, not those of the optimizer they are
  loaded into (DCP reads into the current state tensors: FP8 codes cast to the fp32 moments of an optimizer made
  with other options, remainders dropped where the current parameters are float32; ``AdamW.load_state_dict``
  refuses what results). ``AdamW.load_state_dict`` then checks them against the saved options and converts where
  needed, as it does for a state dict in memory: e.g. a ``bf16-remainder`` state loaded for float32 parameters
  restores the exact fp32 master at the next step.

Usage (on every rank)::

    fp8coat.save_sharded(model, opt, f"{out_dir}/step-{step}")
    fp8coat.load_sharded(model, opt, f"{out_dir}/step-{step}")   # the same or another number of ranks

Collectives: both functions must be called on every rank. An asynchronous save writes in a background thread
that communicates while training goes on: give it a process group of its own (``dist.new_group(backend="gloo")``,
created once), since collectives of two threads on one group would interleave.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from concurrent.futures import Future

import torch

__all__ = ["save_sharded", "load_sharded"]


def _state(model: torch.nn.Module, optimizer: "torch.optim.Optimizer | None") -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


@contextlib.contextmanager
def _quiet_single_process():
    """Without a process group DCP warns, at every call, that it assumes a single process: so it is, here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                                category=UserWarning)
        yield


def save_sharded(model: torch.nn.Module, optimizer: "torch.optim.Optimizer | None", checkpoint_id: "str | os.PathLike",
                 *, asynchronous: bool = False, process_group=None) -> "Future | None":
    """Save ``model`` and ``optimizer`` (None: the model only) into the directory ``checkpoint_id``, each rank its
    shards. ``asynchronous``: copy the state now and write it in a background thread; returns a Future whose
    ``result()`` waits for the checkpoint to be complete (training may go on meanwhile; pass a
    ``process_group`` of its own, see the module docstring). Otherwise writes before returning None."""
    import torch.distributed.checkpoint as dcp

    state = _state(model, optimizer)
    if asynchronous:
        with _quiet_single_process():
            return dcp.async_save(state, checkpoint_id=checkpoint_id, process_group=process_group)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=checkpoint_id, process_group=process_group)
    return None


def load_sharded(model: torch.nn.Module, optimizer: "torch.optim.Optimizer | None", checkpoint_id: "str | os.PathLike",
                 *, strict: bool = True, process_group=None) -> None:
    """Load a checkpoint written by :func:`save_sharded` into ``model`` and ``optimizer`` (None: the model only),
    on any number of ranks. Raises ValueError naming the parameters whose shapes differ from the checkpoint's, that
    it lacks or (``strict``) that only it holds, before anything is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    state = _state(model, optimizer)
    _check_model(state["model"], metadata, checkpoint_id, strict)
    if optimizer is not None:
        _follow_saved_states(state["optimizer"], metadata)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=checkpoint_id, process_group=process_group)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _saved_paths(metadata) -> dict[tuple, object]:
    """The checkpoint's entries by their path in the saved (nested) state dict."""
    paths = getattr(metadata, "planner_data", None) or {}
    return {tuple(paths.get(key, tuple(key.split(".", 1)))): value
            for key, value in metadata.state_dict_metadata.items()}


def _check_model(model_sd: dict, metadata, checkpoint_id, strict: bool) -> None:
    saved = _saved_paths(metadata)
    problems = []
    for name, value in model_sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        entry = saved.get(("model", name))
        if entry is None or not hasattr(entry, "size"):
            problems.append(f"{name}: not in the checkpoint")
        elif tuple(entry.size) != tuple(value.shape):
            problems.append(f"{name}: shape {tuple(entry.size)} in the checkpoint, {tuple(value.shape)} in the model")
    if strict:
        problems += [f"{path[1]}: in the checkpoint, not in the model" for path in saved
                     if len(path) == 2 and path[0] == "model" and path[1] not in model_sd]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"checkpoint {os.fspath(checkpoint_id)!r} does not fit the model "
                         f"({len(problems)} parameters):\n  {shown}")


def _follow_saved_states(optim_sd: dict, metadata) -> None:
    """Make the optimizer's state tensors to load into take the saved dtypes and shapes (so DCP reads them as they
    were saved): keys the checkpoint holds get a tensor of its dtype and shape, sharded like the parameter; keys it
    lacks are dropped (``AdamW.load_state_dict`` then reports any that the saved options need)."""
    saved: dict[str, dict] = {}
    for path, entry in _saved_paths(metadata).items():
        if len(path) == 4 and path[:2] == ("optimizer", "state") and hasattr(entry, "size"):
            saved.setdefault(path[2], {})[path[3]] = entry
    for name, state in optim_sd.get("state", {}).items():
        entries = saved.get(name)
        if entries is None:
            continue  # (dcp.load reports the missing state)
        like = next((v for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)), None)
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in entries]:
            del state[key]
        for key, entry in entries.items():
            current = state.get(key)
            dtype, shape = entry.properties.dtype, tuple(entry.size)
            if isinstance(current, torch.Tensor) and current.dtype == dtype and tuple(current.shape) == shape:
                continue
            if like is None:
                raise ValueError(f"optimizer state {key!r} of {name}: saved as {dtype} {shape}, which this "
                                 "optimizer's state has nothing to place like")
            state[key] = _empty_like_sharded(like, shape, dtype)


def _empty_like_sharded(like: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor of global ``shape`` and ``dtype``, a DTensor sharded like ``like`` if that is one."""
    from .optim.sharding import is_sharded

    if not is_sharded(like):
        return torch.zeros(shape, dtype=dtype, device=like.device)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, _ = compute_local_shape_and_global_offset(shape, like.device_mesh, like.placements)
    local = torch.zeros(local_shape, dtype=dtype, device=like.to_local().device)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)
