"""The training loop behind ``fp8coat train``: data -> model -> convert -> optimizer -> steps, with evaluation,
checkpoints (exact resume), a JSONL metrics log and a progress line.

Per step: ``grad_accum`` micro-batches of ``batch_size × seq_len`` tokens (batch ``i`` of the run depends only on
the seed and ``i``), loss = token-mean cross-entropy in fp32, gradients clipped to ``grad_clip`` (global L2 norm;
:func:`clip_gradients` says what a NaN or inf norm does), AdamW with linear warm-up and cosine decay. Parameters
are bf16 (``fp8coat.AdamW`` keeps the exact fp32 master as bf16 + 16-bit remainders) unless
``master_weights="fp32"`` or ``optimizer="torch"`` (fp32 params, bf16 autocast).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from ..compiling import compile_layers, decoder_layers
from ..conversion import convert
from ..memory import measure_saved_tensors, optimizer_state_bytes
from ..ops.cross_entropy import linear_cross_entropy
from ..optim import AdamW, StepInBackward
from .checkpoint import (
    MANIFEST,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    remove_leftovers,
    save_checkpoint,
    verify_checkpoint,
)
from .config import TrainConfig
from .data import TokenDataset, batch_iterator, eval_batches, prepare_dataset
from .finite import (
    NonFiniteError,
    count_non_finite,
    first_bad_step,
    first_non_finite,
    new_counter,
    new_tracker,
    track_loss,
)
from .presets import PRESETS, build_model, is_checkpoint_dir
from .progress import MetricsLog, Progress, human_count, nonfinite_note
from .runs import (
    check_new_run,
    check_same_data,
    check_same_run,
    clear_run,
    config_differences,
    data_identity,
    new_run_id,
    read_run,
    write_run,
)
from .schedule import lr_at

__all__ = ["train", "resolve_device", "clip_gradients", "FINAL_WINDOW"]

FINAL_WINDOW = 20  # steps averaged into the final training loss


def resolve_device(name: str) -> torch.device:
    """``auto`` (the GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ValueError for another
    name or a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (use --device cpu, or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings included), not on 1-D tensors (norm weights, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    groups = _param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "torch":
        fused = next(model.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused or None)
    if cfg.optimizer == "torchao-fp8":
        try:
            from torchao.optim import AdamWFp8
        except ImportError as ex:
            raise RuntimeError("--optimizer torchao-fp8 needs torchao (pip install torchao); it is a peer "
                               "library used for comparisons, not a dependency of fp8coat") from ex
        return AdamWFp8(groups, lr=cfg.lr, betas=betas)
    return AdamW(groups, lr=cfg.lr, betas=betas, expansion=cfg.expansion, master_weights=cfg.master_weights,
                 seed=cfg.seed)


def _loss(model, ids: torch.Tensor, autocast: bool, head: "torch.nn.Linear | None" = None) -> torch.Tensor:
    """Token-mean next-token cross-entropy (fp32). With ``head`` (the LM head), ``model`` is the decoder body and
    the loss goes through :func:`linear_cross_entropy`: the logits are never held for backward."""
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        if head is not None:
            hidden = model(input_ids=x, use_cache=False).last_hidden_state
            return linear_cross_entropy(hidden, head.weight, y)
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def _compile(model: torch.nn.Module, step_model: torch.nn.Module) -> torch.nn.Module:
    """``--compile``: each decoder layer compiled in place when the model has them (quick to compile, graph breaks
    stay inside one layer, each layer with compiled code of its own: see :mod:`fp8coat.compiling`), else the whole
    step module wrapped. Module names and state_dict keys stay unchanged either way."""
    layers = decoder_layers(model)
    if layers is not None:
        compile_layers(layers)
        return step_model
    return torch.compile(step_model)


def _can_chunk_loss(model) -> bool:
    head = getattr(model, "lm_head", None)
    return (isinstance(head, torch.nn.Linear) and head.bias is None and hasattr(model, "model")
            and getattr(model.config, "final_logit_softcapping", None) is None
            and getattr(model.config, "logit_scale", None) is None)


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients (a 0-d device tensor, no host sync), as
    ``torch.nn.utils.clip_grad_norm_`` computes it. With ``max_norm`` > 0 the gradients are scaled to a norm of at
    most ``max_norm``, and when the norm is NaN or inf every gradient becomes NaN: ``fp8coat.AdamW`` then skips
    the whole step (torch's AdamW writes NaN into the weights). With ``max_norm`` 0 they stay as they are
    (``fp8coat.AdamW`` then skips only the elements that are NaN or inf)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(norm), scale, torch.full_like(scale, float("nan")))
        torch._foreach_mul_(grads, scale)
    return norm


def _nonfinite_counts(bad_grad_steps: torch.Tensor, optimizer, elements_before: int) -> dict:
    """``nonfinite_grad_steps``: the steps of the run so far whose gradient norm was NaN or inf; for an optimizer
    that counts them (``nonfinite_grad_count``: ``fp8coat.AdamW``), ``nonfinite_grad_elements``: the gradient
    elements it skipped in the run so far (``elements_before``: those of the run before a resume). Host syncs,
    read at log and save steps."""
    counts = {"nonfinite_grad_steps": int(bad_grad_steps)}
    skipped = getattr(optimizer, "nonfinite_grad_count", None)
    if isinstance(skipped, torch.Tensor):
        counts["nonfinite_grad_elements"] = elements_before + int(skipped)
    return counts


@torch.no_grad()
def evaluate(model, batches: "list[torch.Tensor]", device, autocast: bool) -> float:
    """Mean validation loss over fixed batches, in eval mode (unquantized forward)."""
    was_training = model.training
    model.eval()
    total = sum(_loss(model, b.to(device), autocast).item() for b in batches) / len(batches)
    model.train(was_training)
    return total


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, label: "str | None" = None,
          quiet: bool = False) -> dict:
    """Run (or resume) one training run; returns its summary (also written to ``<out_dir>/summary.json``).

    A new run refuses an ``out_dir`` that holds a run (ValueError) unless ``overwrite``, which deletes that run's
    files first. ``resume`` continues the run in ``out_dir`` from its newest intact checkpoint (newer damaged ones
    are reported on stderr and skipped); ``cfg`` must equal the run's configuration except in
    :data:`~fp8coat.train.runs.MAY_CHANGE_ON_RESUME` (``steps`` may grow: the cosine decay then spans the new
    total). A resume uses the checkpoint's tokenizer, builds a fine-tuned model from the checkpoint (not from
    the checkpoint it fine-tunes) and refuses training data that is not the data the run started with
    (:func:`~fp8coat.train.runs.check_same_data`). A finished run keeps its summary (or gets its missing one
    recomputed). When the loss, the weights or the optimizer state become non-finite, the run stops with
    :class:`~fp8coat.train.finite.NonFiniteError` naming the first bad step, without writing a checkpoint of them.
    Steps whose gradient norm was NaN or inf (see :func:`clip_gradients`) are counted in the metrics log, on the
    progress line and in the summary.
    """
    cfg.validate()
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    device = resolve_device(cfg.device)
    label = label or cfg.recipe
    if resume:
        run_id, ckpt, state = _resume_point(cfg)
        if state["step"] >= cfg.steps:
            kept = _finished_summary(cfg, state["step"], label)
            if kept is not None:
                return kept
    else:
        check_new_run(cfg.out_dir, overwrite)
        run_id, ckpt, state = new_run_id(), None, {}
    model_source = _model_source(cfg, ckpt)
    if model_source != ckpt and os.path.isdir(model_source):
        verify_checkpoint(model_source)  # fine-tuning from a checkpoint: its files as written
    data = prepare_dataset(cfg.data, tokenizer=_tokenizer(cfg, ckpt), vocab_size=cfg.vocab_size,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    identity = data_identity(data)
    if ckpt is not None:
        _check_data(cfg, ckpt, state, identity)
    train_ds, val_ds = TokenDataset(data.train_path), TokenDataset(data.val_path)
    val = eval_batches(val_ds, cfg.batch_size, cfg.seq_len, cfg.eval_batches)  # validates seq_len vs. the data

    fp32_params = cfg.optimizer != "fp8coat" or cfg.master_weights == "fp32"
    autocast = fp32_params and cfg.recipe == "bf16"
    dtype = torch.float32 if fp32_params else torch.bfloat16
    model, source = build_model(model_source, data.vocab_size, cfg.seq_len, dtype, device, cfg.seed)
    model = convert(model, cfg.recipe)
    model.train()
    optimizer = _make_optimizer(cfg, model)
    in_backward = StepInBackward(optimizer) if cfg.step_in_backward else None
    n_params = sum(p.numel() for p in model.parameters())

    start = _load_resume_point(ckpt, model, optimizer) if ckpt is not None else 0
    if overwrite:
        clear_run(cfg.out_dir)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # the history up to the checkpoint (a damaged line in it is an error, before anything else changes)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), truncate_after_step=start)
    if ckpt is not None:
        remove_leftovers(cfg.out_dir)
        prune_checkpoints(cfg.out_dir, cfg.keep_last, start)
    write_run(cfg.out_dir, cfg, run_id, identity)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    if not quiet:
        print(f"[{label}] {source}: {human_count(n_params)} params, recipe {cfg.recipe}, optimizer {cfg.optimizer}, "
              f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} params, device {device}, data {data.description} "
              f"({human_count(data.n_train_tokens)} train tokens), {cfg.steps} steps of "
              f"{human_count(tokens_per_step)} tokens" + (_resume_note(ckpt, state, cfg) if ckpt else ""),
              flush=True)

    head = model.lm_head if cfg.chunked_loss and _can_chunk_loss(model) else None
    step_model = model.model if head is not None else model  # with the chunked loss, the body runs alone
    if cfg.compile:
        step_model = _compile(model, step_model)
    progress = Progress(cfg.steps, label, start=start) if not quiet else None
    batches = batch_iterator(train_ds, cfg.batch_size, cfg.seq_len, cfg.seed, start_step=start * cfg.grad_accum)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last = state.get("last", {})
    # per-step losses on device; a resumed run continues the window its checkpoint saved
    recent: "collections.deque[torch.Tensor]" = collections.deque(
        (torch.tensor(v, device=device) for v in state.get("recent_losses", [])), maxlen=FINAL_WINDOW)
    diverged = new_tracker(device)  # the first step with a non-finite loss, kept on device (no sync per step)
    bad_grad_steps = new_counter(device, state.get("nonfinite_grad_steps", 0))  # steps with a NaN/inf grad norm
    elements_before = state.get("nonfinite_grad_elements", 0)  # skipped by the optimizer before a resume
    t_log, steps_since = time.time(), 0
    val_loss = last.get("val_loss") if last.get("step") == start else None
    for step in range(start, cfg.steps):
        lr = lr_at(step, lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # optimizers that keep lr on device expect it updated in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            loss = _loss(step_model, next(batches).to(device), autocast, head)
            last_micro = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if in_backward is None or last_micro else in_backward.accumulating():
                (loss / cfg.grad_accum).backward()  # with step-in-backward, the last one also updates
            loss_sum += loss.detach()
        done = step + 1
        recent.append(loss_sum / cfg.grad_accum)
        track_loss(diverged, done, recent[-1])
        grad_norm = None
        if in_backward is None:
            grad_norm = clip_gradients(model, cfg.grad_clip)  # --grad-clip 0: the norm is only measured
            count_non_finite(bad_grad_steps, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps_since += 1
        is_eval = (cfg.eval_every > 0 and done % cfg.eval_every == 0) or done == cfg.steps
        if done % cfg.log_every == 0 or is_eval or done == start + 1:
            train_loss = loss_sum.item() / cfg.grad_accum  # the host sync of this step
            _stop_if_diverged(diverged, cfg.out_dir)
            elapsed = time.time() - t_log
            record = {"step": done, "loss": train_loss, "lr": lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      **_nonfinite_counts(bad_grad_steps, optimizer, elements_before),
                      "tokens": done * tokens_per_step, "tok_per_s": steps_since * tokens_per_step / elapsed}
            if device.type == "cuda":
                record["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if is_eval:
                val_loss = evaluate(model, val, device, autocast)
                record["val_loss"] = val_loss
            log.write(record)
            last = record
            if progress:
                progress.update(done, loss=train_loss, val_loss=record.get("val_loss"), lr=lr,
                                tok_per_s=record["tok_per_s"], mem_gib=record.get("mem_gib"),
                                nonfinite=nonfinite_note(record["nonfinite_grad_steps"],
                                                         record.get("nonfinite_grad_elements")))
            t_log, steps_since = time.time(), 0
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            _check_before_save(diverged, model, optimizer, cfg.out_dir, done)
            saved = {"run_id": run_id, "config": cfg.to_dict(), "data_identity": identity, "last": last,
                     "recent_losses": torch.stack(list(recent)).tolist(),
                     **_nonfinite_counts(bad_grad_steps, optimizer, elements_before)}
            save_checkpoint(cfg.out_dir, done, model, optimizer, saved, data.tokenizer_path)
            prune_checkpoints(cfg.out_dir, cfg.keep_last, done)
    if progress:
        progress.close()
    log.close()

    final_train = float(torch.stack(list(recent)).mean()) if recent else None
    summary = _summary(cfg, model, optimizer, val, device, autocast, n_params, final_train, val_loss)
    summary["final_train_window"] = len(recent)
    summary.update(_nonfinite_counts(bad_grad_steps, optimizer, elements_before))
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _resume_point(cfg: TrainConfig) -> "tuple[str, str, dict]":
    """``(run id, checkpoint, its state)`` to resume ``cfg``'s run from: the newest intact checkpoint of the run
    in ``cfg.out_dir``, whose configuration ``cfg`` may change only where a resume allows it."""
    run = read_run(cfg.out_dir)
    run_id = run.get("run_id") if run else None
    path, skipped = latest_intact_checkpoint(cfg.out_dir)
    for reason in skipped:
        print(f"fp8coat train: skipping damaged checkpoint {reason}", file=sys.stderr, flush=True)
    if path is None and skipped:
        raise ValueError(f"--resume: no intact checkpoint under {cfg.out_dir}/checkpoints: {'; '.join(skipped)}")
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {cfg.out_dir}/checkpoints (start the run again "
                                "with --overwrite)")
    if not os.path.exists(os.path.join(path, MANIFEST)):
        print(f"fp8coat train: warning: checkpoint {path} has no {MANIFEST} (an older format): its files cannot be "
              "checked for damage", file=sys.stderr, flush=True)
    state = read_state(path)
    check_same_run(run_id, state, path, cfg.out_dir)
    state_file = os.path.join(path, "state.json")
    differences = config_differences(state.get("config", {}), cfg.to_dict(), state_file)
    if differences:
        listed = "; ".join(f"{name} {ours} in the run, {theirs} in the checkpoint"
                           for name, ours, theirs in differences)
        raise ValueError(f"checkpoint {path} was written with another configuration than the run's (the run: "
                         f"{cfg.out_dir}/config.json with the flags given; the checkpoint: {state_file}): {listed}. "
                         "Restore config.json, or remove the checkpoint")
    if cfg.steps < state["step"]:
        raise ValueError(f"--steps {cfg.steps} is below the step of the checkpoint to resume ({state['step']}: "
                         f"{path})")
    return run_id or state.get("run_id") or new_run_id(), path, state


def _model_source(cfg: TrainConfig, ckpt: "str | None") -> str:
    """What the model is built from: ``--model``, except on resume of a run whose ``--model`` is a checkpoint
    folder (fine-tuning) or no longer exists: then the checkpoint to resume, which holds the architecture."""
    if ckpt is not None and cfg.model not in PRESETS and (is_checkpoint_dir(cfg.model) or
                                                          not os.path.exists(cfg.model)):
        return ckpt
    return cfg.model


def _tokenizer(cfg: TrainConfig, ckpt: "str | None") -> str:
    """The tokenizer to prepare the data with: on resume the checkpoint's ``tokenizer.json`` (the one the run
    trained with); when fine-tuning a checkpoint with ``--tokenizer bpe``, that checkpoint's; else
    ``--tokenizer``."""
    for folder in (ckpt, cfg.model if cfg.tokenizer == "bpe" else None):
        if folder is not None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return os.path.join(folder, "tokenizer.json")
    return cfg.tokenizer


def _check_data(cfg: TrainConfig, ckpt: str, state: dict, identity: dict) -> None:
    """ValueError if the prepared data (``identity``) is not the data the run started with, as recorded in the
    checkpoint's ``state.json`` (else in ``config.json``); a warning for a run that records none."""
    run = read_run(cfg.out_dir) or {}
    for recorded, where in ((state.get("data_identity"), os.path.join(ckpt, "state.json")),
                            (run.get("data_identity"), os.path.join(cfg.out_dir, "config.json"))):
        if isinstance(recorded, dict):
            check_same_data(recorded, identity, where)
            return
    print(f"fp8coat train: warning: the run in {cfg.out_dir} records no identity of its training data (written "
          "by an older fp8coat): the data cannot be checked against the data the run started with; it is "
          "recorded from now on", file=sys.stderr, flush=True)


def _load_resume_point(path: str, model, optimizer) -> int:
    """Load checkpoint ``path`` into ``model`` and ``optimizer``; returns its step. ValueError if it holds
    non-finite values."""
    step = load_checkpoint(path, model, optimizer)["step"]
    bad = first_non_finite(model, optimizer)
    if bad is not None:
        raise ValueError(f"checkpoint {path} holds non-finite values ({bad}): it was written after its run "
                         "diverged; remove it to resume from an earlier checkpoint")
    return step


def _finished_summary(cfg: TrainConfig, step: int, label: str) -> "dict | None":
    """The summary of a run that already finished, kept as it is; None (after saying so) when it is missing."""
    path = os.path.join(cfg.out_dir, "summary.json")
    where = f"[{label}] the run in {cfg.out_dir} already finished at step {step} of {cfg.steps}"
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        print(f"{where}; recomputing its missing summary.json", file=sys.stderr, flush=True)
        return None
    print(f"{where}: nothing to train, its summary is kept (pass a larger --steps to extend it)", file=sys.stderr,
          flush=True)
    return summary


def _resume_note(ckpt: str, state: dict, cfg: TrainConfig) -> str:
    note = f", resuming at step {state['step']} ({ckpt})"
    before = state.get("config", {}).get("steps", cfg.steps)
    if before != cfg.steps:
        note += f", --steps changed from {before} (the cosine decay now ends at step {cfg.steps})"
    return note


def _stop_if_diverged(diverged: torch.Tensor, out_dir: str) -> None:
    first = first_bad_step(diverged)
    if first:
        raise NonFiniteError(f"the training loss became non-finite at step {first}: the run diverged (lower --lr, "
                             f"or check the data); stopped without writing a checkpoint after it{_newest(out_dir)}")


def _check_before_save(diverged: torch.Tensor, model, optimizer, out_dir: str, step: int) -> None:
    _stop_if_diverged(diverged, out_dir)
    bad = first_non_finite(model, optimizer)
    if bad is not None:
        raise NonFiniteError(f"{bad} became non-finite at step {step}: the run diverged (lower --lr, or check the "
                             f"data); stopped without writing its checkpoint{_newest(out_dir)}")


def _newest(out_dir: str) -> str:
    path = latest_checkpoint(out_dir)
    return f" (the newest checkpoint is {path})" if path else ""


def _summary(cfg, model, optimizer, val, device, autocast, n_params, final_train, val_loss) -> dict:
    history = MetricsLog.read(os.path.join(cfg.out_dir, "metrics.jsonl"))
    speeds = [r["tok_per_s"] for r in history[1:] if "tok_per_s" in r]
    summary = {
        "recipe": cfg.recipe, "optimizer": cfg.optimizer, "params": n_params, "steps": cfg.steps,
        "final_train_loss": final_train,  # mean over the last FINAL_WINDOW steps
        "final_val_loss": val_loss,
        "tok_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if device.type == "cuda":
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # counted exactly on the CPU: bytes the decoder keeps for backward for one micro-batch
        model.train()
        body = getattr(model, "model", model)  # HF causal LMs: the decoder without the LM head and the loss
        ids = val[0][:, :-1].to(device)
        _, saved = measure_saved_tensors(lambda: body(input_ids=ids, use_cache=False).last_hidden_state,
                                         modules=model)
        summary["saved_activation_bytes"] = saved.total_bytes
    return summary
