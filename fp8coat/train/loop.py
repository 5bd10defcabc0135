"""The training loop behind ``fp8coat train``: data -> model -> convert -> optimizer -> steps, with evaluation,
checkpoints (exact resume), a JSONL metrics log and a progress line.

Per step: ``grad_accum`` micro-batches of ``batch_size × seq_len`` tokens (batch ``i`` of the run depends only on
the seed and ``i``), loss = token-mean cross-entropy in fp32, gradients clipped to ``grad_clip`` (global L2 norm),
AdamW with linear warm-up and cosine decay. Parameters are bf16 (``fp8coat.AdamW`` keeps the exact fp32 master as
bf16 + 16-bit remainders) unless ``master_weights="fp32"`` or ``optimizer="torch"`` (fp32 params, bf16 autocast).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from ..compiling import compile_layers, decoder_layers
from ..conversion import convert
from ..memory import measure_saved_tensors, optimizer_state_bytes
from ..ops.cross_entropy import linear_cross_entropy
from ..optim import AdamW, StepInBackward
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .presets import build_model
from .progress import MetricsLog, Progress
from .schedule import lr_at

__all__ = ["train", "resolve_device", "FINAL_WINDOW"]

FINAL_WINDOW = 20  # steps averaged into the final training loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
def evaluate(model, batches: "list[torch.Tensor]", device, autocast: bool) -> float:
    """Mean validation loss over fixed batches, in eval mode (unquantized forward)."""
    was_training = model.training
    model.eval()
    total = sum(_loss(model, b.to(device), autocast).item() for b in batches) / len(batches)
    model.train(was_training)
    return total


def train(cfg: TrainConfig, *, resume: bool = False, label: "str | None" = None, quiet: bool = False) -> dict:
    """Run (or resume) one training run; returns its summary (also written to ``<out_dir>/summary.json``)."""
    from ..data import batch_iterator, eval_batches, prepare_dataset, TokenDataset

    cfg.validate()
    device = resolve_device(cfg.device)
    tokenizer = cfg.tokenizer
    ckpt_tokenizer = os.path.join(cfg.model, "tokenizer.json")
    if tokenizer == "bpe" and os.path.isfile(ckpt_tokenizer):  # fine-tuning: keep the checkpoint's tokenizer
        tokenizer = ckpt_tokenizer
    data = prepare_dataset(cfg.data, tokenizer=tokenizer, vocab_size=cfg.vocab_size,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_ds, val_ds = TokenDataset(data.train_path), TokenDataset(data.val_path)
    val = eval_batches(val_ds, cfg.batch_size, cfg.seq_len, cfg.eval_batches)  # validates seq_len vs. the data

    fp32_params = cfg.optimizer != "fp8coat" or cfg.master_weights == "fp32"
    autocast = fp32_params and cfg.recipe == "bf16"
    dtype = torch.float32 if fp32_params else torch.bfloat16
    model, source = build_model(cfg.model, data.vocab_size, cfg.seq_len, dtype, device, cfg.seed)
    model = convert(model, cfg.recipe)
    model.train()
    optimizer = _make_optimizer(cfg, model)
    in_backward = StepInBackward(optimizer) if cfg.step_in_backward else None
    n_params = sum(p.numel() for p in model.parameters())

    os.makedirs(cfg.out_dir, exist_ok=True)
    start = 0
    if resume:
        ckpt = latest_checkpoint(cfg.out_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {cfg.out_dir}/checkpoints")
        start = load_checkpoint(ckpt, model, optimizer)["step"]
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), truncate_after_step=start)
    label = label or cfg.recipe
    if not quiet:
        print(f"[{label}] {source}: {n_params / 1e6:.1f}M params, recipe {cfg.recipe}, optimizer {cfg.optimizer}, "
              f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} params, device {device}, data {data.description} "
              f"({data.n_train_tokens / 1e6:.1f}M train tokens), {cfg.steps} steps of "
              f"{cfg.batch_size * cfg.grad_accum * cfg.seq_len} tokens" + (f", resuming at step {start}" if resume else ""),
              flush=True)

    head = model.lm_head if cfg.chunked_loss and _can_chunk_loss(model) else None
    step_model = model.model if head is not None else model  # with the chunked loss, the body runs alone
    if cfg.compile:
        step_model = _compile(model, step_model)
    progress = Progress(cfg.steps, label) if not quiet else None
    batches = batch_iterator(train_ds, cfg.batch_size, cfg.seq_len, cfg.seed, start_step=start * cfg.grad_accum)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    last = {}
    recent: "collections.deque[torch.Tensor]" = collections.deque(maxlen=FINAL_WINDOW)  # per-step losses, on device
    t_log, steps_since = time.time(), 0
    val_loss = None
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
        recent.append(loss_sum / cfg.grad_accum)
        grad_norm = None
        if in_backward is None:
            # --grad-clip 0: no clipping (the norm is still measured for the log)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps_since += 1
        done = step + 1
        is_eval = (cfg.eval_every > 0 and done % cfg.eval_every == 0) or done == cfg.steps
        if done % cfg.log_every == 0 or is_eval or done == start + 1:
            train_loss = loss_sum.item() / cfg.grad_accum  # the host sync of this step
            if not math.isfinite(train_loss):
                raise RuntimeError(f"step {done}: loss is {train_loss}; stopping (lower --lr or check the data)")
            elapsed = time.time() - t_log
            record = {"step": done, "loss": train_loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
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
                                tok_per_s=record["tok_per_s"], mem_gib=record.get("mem_gib"))
            t_log, steps_since = time.time(), 0
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            save_checkpoint(cfg.out_dir, done, model, optimizer, {"config": cfg.to_dict(), "last": last},
                            data.tokenizer_path)
    if progress:
        progress.close()
    log.close()

    final_train = float(torch.stack(list(recent)).mean()) if recent else None
    summary = _summary(cfg, model, optimizer, val, device, autocast, n_params, final_train, val_loss)
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _summary(cfg, model, optimizer, val, device, autocast, n_params, final_train, val_loss) -> dict:
    history = MetricsLog.read(os.path.join(cfg.out_dir, "metrics.jsonl"))
    speeds = [r["tok_per_s"] for r in history[1:] if "tok_per_s" in r]
    summary = {
        "recipe": cfg.recipe, "optimizer": cfg.optimizer, "params": n_params, "steps": cfg.steps,
        "final_train_loss": final_train,  # mean over the last FINAL_WINDOW steps
        "final_val_loss": val_loss,
        "tok_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
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
