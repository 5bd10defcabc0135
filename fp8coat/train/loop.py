"""The training loop behind ``fp8coat train``: data -> model -> convert -> optimizer -> steps, with evaluation,
checkpoints (exact resume), a JSONL metrics log and a progress line.

Per step: ``grad_accum`` micro-batches of ``batch_size × seq_len`` tokens (batch ``i`` of the run depends only on
the seed and ``i``), loss = token-mean cross-entropy in fp32, gradients clipped to ``grad_clip`` (global L2 norm;
:func:`clip_gradients` says what a NaN or inf norm does), AdamW with linear warm-up and cosine decay. Parameters
are bf16 (``fp8coat.AdamW`` keeps the exact fp32 master as bf16 + 16-bit remainders) unless
``master_weights="fp32"`` or ``optimizer="torch"`` (fp32 params, bf16 autocast).

Under ``torchrun`` with ``--fsdp`` (:mod:`fp8coat.train.distributed`, :mod:`fp8coat.train.fsdp`) the model is
sharded over the ranks and each rank takes its contiguous share of the rows of every micro-batch: the batches of
a step are those of one process, the loss reported is their mean over all ranks, the gradient norm is the norm
of the whole gradients. Rank 0 alone prints, logs and writes the run's files; checkpoints go through
``torch.distributed.checkpoint`` (:mod:`fp8coat.train.sharded_checkpoint`) and resume on any number of ranks.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiling import compile_layers, decoder_layers
from ..conversion import convert, weight_caches
from ..memory import measure_saved_tensors, optimizer_state_bytes
from ..nn.fp8_all_gather import fp8_all_gather_parameters, precompute_fp8_scales
from ..ops.cross_entropy import linear_cross_entropy
from ..optim import AdamW, StepInBackward
from ..optim.sharding import is_sharded, local_tensor
from ..recipe import get_recipe
from . import vlm_run
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
from .chunked_loss import can_chunk_loss
from .config import TrainConfig
from .data import PreparedData, TokenDataset, batch_iterator, eval_batches, prepare_dataset
from .distributed import Ranks, resolve_device, sharded_norm, start_ranks, stop_ranks
from .finite import (
    NonFiniteError,
    count_non_finite,
    device_int,
    first_non_finite,
    track_loss,
    track_streak,
)
from .fsdp import Objective, reshard, shard_model
from .memory_plan import gpu_memory_gib, report_plan
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
from .sharded_checkpoint import (
    is_sharded_checkpoint,
    load_into_shards,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from .vlm_presets import VLM_PRESETS

__all__ = ["FINAL_WINDOW", "clip_gradients", "resolve_device", "train"]

FINAL_WINDOW = 20  # steps averaged into the final training loss


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
                 seed=cfg.seed, record_amax_of=fp8_all_gather_parameters(model))  # ([] without FP8 all-gather)


def _loss(model, ids: torch.Tensor, autocast: bool, head: torch.nn.Linear | None = None) -> torch.Tensor:
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
    """``--compile``: each decoder layer compiled in place when the model has them (all layers share one compiled
    code, so compile time does not grow with depth; graph breaks stay inside one layer: see
    :mod:`fp8coat.compiling`), else the whole step module wrapped. Module names and state_dict keys stay unchanged
    either way."""
    layers = decoder_layers(model)
    if layers is not None:
        compile_layers(layers)
        return step_model
    return torch.compile(step_model)


def _checkpoint_layers(model: torch.nn.Module) -> None:
    """``--activation-checkpointing``: HF's non-reentrant gradient checkpointing of each decoder layer (module
    names and state_dict keys unchanged); ValueError for models without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--activation-checkpointing uses HF gradient checkpointing, which "
                         f"{type(model).__name__} does not support: train without it")
    enable = getattr(model, "activation_checkpointing_enable", None)  # its name in newer transformers
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients (a 0-d device tensor, no host sync), as
    ``torch.nn.utils.clip_grad_norm_`` computes it. With ``max_norm`` > 0 the gradients are scaled to a norm of at
    most ``max_norm``, and when the norm is NaN or inf every gradient becomes NaN: ``fp8coat.AdamW`` then skips
    the whole step (torch's AdamW writes NaN into the weights). With ``max_norm`` 0 they stay as they are
    (``fp8coat.AdamW`` then skips only the elements that are NaN or inf). Sharded (DTensor) gradients, as FSDP2
    makes them, give the norm of the whole gradients on every rank, and each rank scales its shards."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if any(is_sharded(g) for g in grads):  # FSDP: each rank holds a shard; the norm is of the whole gradients
        if not all(is_sharded(g) for g in grads):
            raise ValueError("some gradients are sharded (DTensors) and some are not: their global norm is "
                             "undefined")
        norm = sharded_norm(grads)
        grads = [local_tensor(g) for g in grads]
    else:
        norms = torch._foreach_norm(grads)
        norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        scale = torch.where(torch.isfinite(norm), scale, torch.full_like(scale, float("nan")))
        torch._foreach_mul_(grads, scale)
    return norm


@dataclass(frozen=True)
class _Run:
    """A run set up to train (:func:`_setup`): what its steps, evaluations and checkpoints work with."""

    cfg: TrainConfig
    run_id: str
    device: torch.device
    data: PreparedData | vlm_run.VlmData  # text, or image-text for a vision-language model
    identity: dict  # data_identity(data): recorded in config.json and in every checkpoint
    train_data: TokenDataset | None  # text runs
    val: list  # the fixed validation batches (tensors of token ids, or a VLM's dicts of tensors)
    model: torch.nn.Module
    source: str  # what the model was built from
    optimizer: torch.optim.Optimizer
    in_backward: StepInBackward | None  # with --step-in-backward
    step_model: torch.nn.Module  # what a step runs: the model, or with the chunked loss its body (maybe compiled)
    head: torch.nn.Linear | None  # with the chunked loss, the LM head
    autocast: bool  # bf16 autocast: fp32 params with the bf16 recipe
    start: int  # the step the run starts at: 0, or on resume the checkpoint's
    ranks: Ranks  # the processes of the run (one unless sharded)
    objective: Objective | None  # sharded runs: the FSDP root whose forward is the loss (steps and evaluation)

    @property
    def vlm(self) -> bool:
        return isinstance(self.data, vlm_run.VlmData)

    def train_batches(self):
        """The run's micro-batches from its start step on (as the data gives them)."""
        start = self.start * self.cfg.grad_accum
        if self.vlm:
            return vlm_run.train_batches(self.data, self.cfg.batch_size, start,
                                         vlm_run.data_workers(self.cfg.data_workers, self.device))
        return batch_iterator(self.train_data, self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed,
                              start_step=start)

    def loss(self, batch) -> torch.Tensor:
        """The training loss of micro-batch ``batch`` (this rank's rows of it)."""
        if self.vlm:
            return vlm_run.vlm_step_loss(self.step_model, vlm_run.to_model(batch, self.model), self.autocast,
                                         self.cfg.chunked_loss)
        ids = self.ranks.rows(batch).to(self.device)
        if self.objective is not None:
            return self.objective(ids)
        return _loss(self.step_model, ids, self.autocast, self.head)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class _Tracking:
    """What the loop tracks across steps on the device (updated without a host sync, read at log and save
    steps); a checkpoint's state carries it over a resume."""

    recent: collections.deque  # the mean losses of the last FINAL_WINDOW steps (0-d tensors)
    diverged: torch.Tensor  # the first step whose loss was not finite, 0 while none was (finite.track_loss)
    bad_grad_steps: torch.Tensor  # the steps whose gradient norm was NaN or inf (finite.count_non_finite)
    elements_before: int  # gradient elements the optimizer skipped before a resume
    streak: torch.Tensor  # consecutive steps up to now whose gradient norm was NaN or inf (finite.track_streak)
    stuck: torch.Tensor  # the step where the streak reached the run's max_nonfinite_streak, 0 while it did not

    @classmethod
    def restore(cls, state: dict, device: torch.device) -> _Tracking:
        """Empty for a new run (``state`` ``{}``), else continued from a checkpoint's state."""
        recent = collections.deque((torch.tensor(v, device=device) for v in state.get("recent_losses", [])),
                                   maxlen=FINAL_WINDOW)
        return cls(recent, device_int(device), device_int(device, state.get("nonfinite_grad_steps", 0)),
                   state.get("nonfinite_grad_elements", 0), device_int(device, state.get("nonfinite_grad_streak", 0)),
                   device_int(device))

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, max_streak: int) -> None:
        """Step ``step``'s mean loss and gradient norm (None with step-in-backward); ``max_streak``: the run's
        ``max_nonfinite_streak``."""
        self.recent.append(loss)
        track_loss(self.diverged, step, loss)
        if grad_norm is not None:
            count_non_finite(self.bad_grad_steps, grad_norm)
            track_streak(self.streak, self.stuck, step, grad_norm, max_streak)

    def counts(self, optimizer, ranks: Ranks) -> dict:
        """``nonfinite_grad_steps``: the steps of the run so far whose gradient norm was NaN or inf; for an
        optimizer that counts them (``nonfinite_grad_count``: ``fp8coat.AdamW``), ``nonfinite_grad_elements``: the
        gradient elements it skipped in the run so far (summed over the ranks' shards). Host syncs, read at log
        and save steps (by every rank)."""
        counts = {"nonfinite_grad_steps": int(self.bad_grad_steps), "nonfinite_grad_streak": int(self.streak)}
        skipped = getattr(optimizer, "nonfinite_grad_count", None)
        if isinstance(skipped, torch.Tensor):
            counts["nonfinite_grad_elements"] = self.elements_before + ranks.sum_int(int(skipped))
        return counts


@torch.no_grad()
def evaluate(run: _Run) -> float:
    """Mean validation loss over the fixed batches, in eval mode (unquantized forward). Sharded: each rank takes
    its rows of every batch, and the loss of a batch is the mean over the ranks."""
    if run.vlm:
        return vlm_run.vlm_val_loss(run.model, run.val, run.autocast)
    module = run.objective if run.objective is not None else run.model
    was_training = module.training
    module.eval()
    if run.objective is None:
        total = sum(_loss(run.model, b.to(run.device), run.autocast).item() for b in run.val) / len(run.val)
    else:
        losses = torch.stack([run.objective(run.ranks.rows(b).to(run.device), chunked=False) for b in run.val])
        reshard(run.objective)
        total = sum(loss.item() for loss in run.ranks.mean(losses)) / len(run.val)
    module.train(was_training)
    return total


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, label: str | None = None,
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

    Launched by ``torchrun`` with ``cfg.fsdp`` on (or ``auto`` with more than one process), every process calls
    this: the model is sharded over them (see the module's docstring) and each returns the run's summary.
    """
    cfg.validate()
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it: pass only one")
    ranks, device = start_ranks(cfg.fsdp, cfg.device)
    try:
        summary = _train(cfg, ranks, device, resume, overwrite, label or cfg.recipe, quiet or not ranks.is_main)
    except BaseException:
        stop_ranks(ranks, finished=False)
        raise
    stop_ranks(ranks)
    return summary


def _train(cfg: TrainConfig, ranks: Ranks, device: torch.device, resume: bool, overwrite: bool, label: str,
           quiet: bool) -> dict:
    if ranks.sharded:
        _check_sharded(cfg, ranks)
    if resume:
        run_id, ckpt, state = ranks.on_main(lambda: _resume_point(cfg))
        if state["step"] >= cfg.steps:
            kept = ranks.on_main(lambda: _finished_summary(cfg, state["step"], label))
            if kept is not None:
                return kept
    else:
        ranks.on_main(lambda: check_new_run(cfg.out_dir, overwrite))
        run_id, ckpt, state = ranks.on_main(new_run_id), None, {}
    run = _setup(cfg, ranks, run_id, device, ckpt, state, quiet)
    log = ranks.on_main(lambda: _open_run(run, ckpt, overwrite), share=False)  # rank 0 writes the run's files
    if not quiet:
        print(f"[{label}] {_describe(run)}" + (_resume_note(ckpt, state, cfg) if ckpt else ""), flush=True)
    progress = Progress(cfg.steps, label, start=run.start) if not quiet else None
    try:
        tracking, val_loss = _train_steps(run, state, log, progress)
    finally:  # also when the run stops (divergence, an interrupt): the metrics written so far are kept
        if progress:
            progress.close()
        if log is not None:
            log.close()
    return _finish(run, tracking, val_loss)


def _check_sharded(cfg: TrainConfig, ranks: Ranks) -> None:
    """ValueError for what a sharded run does not support."""
    ranks.check_batch(cfg.batch_size)
    if cfg.optimizer == "torchao-fp8":
        raise ValueError(f"--optimizer torchao-fp8 is not supported with --fsdp (a model sharded over "
                         f"{ranks.world_size} rank{'s' if ranks.world_size != 1 else ''}): train without it")


def _param_dtype(cfg: TrainConfig) -> torch.dtype:
    """bf16 params, except fp32 ones for ``master_weights="fp32"`` and for the other optimizers."""
    return torch.float32 if cfg.optimizer != "fp8coat" or cfg.master_weights == "fp32" else torch.bfloat16


def _setup(cfg: TrainConfig, ranks: Ranks, run_id: str, device: torch.device, ckpt: str | None, state: dict,
           quiet: bool = False) -> _Run:
    """The run's data, model and optimizer (loaded from checkpoint ``ckpt`` with its ``state`` on resume);
    ValueError where the data or the checkpoint does not fit the run. Sharded, the model is sharded before the
    optimizer is made. On a GPU the memory plan is printed first (``fp8coat.train.memory_plan``)."""
    model_source = _model_source(cfg, ckpt)
    if model_source != ckpt and os.path.isdir(model_source):
        ranks.on_main(lambda: verify_checkpoint(model_source))  # fine-tuning from a checkpoint: its files as written
    dtype = _param_dtype(cfg)
    vlm = vlm_run.is_vlm(model_source)
    if vlm:
        vlm_run.check_vlm_options(cfg, cfg.model, ranks.sharded)
        model, data, source = vlm_run.setup_vlm(cfg, model_source, ckpt, dtype, device)
        identity, train_data = data.identity(), None
        if ckpt is not None:
            _check_data(cfg, ckpt, state, identity)
        val = data.images.val_batches(cfg.batch_size, cfg.eval_batches)
        if device.type == "cuda":  # says that there is none
            report_plan(cfg, model_source, len(data.processor.tokenizer), 1, gpu_memory_gib(device), quiet)
    else:
        model, data, identity, train_data, val, source = _setup_text(cfg, ranks, model_source, ckpt, state, device,
                                                                      dtype, quiet)
    model = convert(model, get_recipe(cfg.recipe).with_options(cache_fp8_weights=cfg.cache_fp8_weights,
                                                               fp8_attention=cfg.fp8_attention))
    model.train()
    if cfg.activation_checkpointing:
        _checkpoint_layers(model)
    autocast = dtype == torch.float32 and cfg.recipe == "bf16"
    chunked = cfg.chunked_loss and can_chunk_loss(model) and not vlm  # VLMs: vlm_loss chunks
    objective = None
    if cfg.fp8_all_gather and not ranks.sharded:
        raise ValueError("--fp8-all-gather gathers weights over the ranks of a sharded run: this run is not sharded "
                         "(--fsdp auto shards only under torchrun with WORLD_SIZE > 1; --fsdp on shards one process)")
    if ranks.sharded:
        objective = shard_model(model, Objective(model, _loss, autocast, chunked), cfg.fsdp_reduce_fp32,
                                cfg.fp8_all_gather)
    optimizer = _make_optimizer(cfg, model)
    in_backward = StepInBackward(optimizer) if cfg.step_in_backward else None
    start = _load_resume_point(ckpt, model, optimizer) if ckpt is not None else 0
    head = model.lm_head if chunked else None
    step_model = model.model if head is not None else model  # with the chunked loss, the body runs alone
    if cfg.compile and vlm:
        vlm_run.compile_vlm(model)
    elif cfg.compile:
        if objective is not None and decoder_layers(model) is None:
            raise ValueError("--compile with --fsdp compiles each decoder layer, and this model has none "
                             "(model.model.layers): train without --compile")
        step_model = _compile(model, step_model)
    return _Run(cfg, run_id, device, data, identity, train_data, val, model, source, optimizer, in_backward,
                step_model, head, autocast=autocast, start=start, ranks=ranks, objective=objective)


def _setup_text(cfg: TrainConfig, ranks: Ranks, model_source: str, ckpt: str | None, state: dict,
                device: torch.device, dtype: torch.dtype, quiet: bool):
    """A text run's ``(model, data, identity, train_data, val, source)``: the tokenized data, then the model
    (unconverted); on a GPU the memory plan is printed before the model is built."""
    if vlm_run.is_image_text_source(cfg.data):
        raise ValueError(f"--data {cfg.data} is image-text data: it trains a vision-language model (--model "
                         f"{', '.join(VLM_PRESETS)}, or an HF LLaVA / Qwen2-VL checkpoint folder), not the "
                         f"text-only model {cfg.model}")
    with ranks.main_first():  # rank 0 prepares (and caches) the data, the others then read it
        data = prepare_dataset(cfg.data, tokenizer=_tokenizer(cfg, ckpt), vocab_size=cfg.vocab_size,
                               val_fraction=cfg.val_fraction, seed=cfg.seed)
    identity = ranks.on_main(lambda: data_identity(data))
    if ckpt is not None:
        ranks.on_main(lambda: _check_data(cfg, ckpt, state, identity))
    train_data = data.train_dataset()
    val = eval_batches(data.val_dataset(), cfg.batch_size, cfg.seq_len, cfg.eval_batches)  # checks seq_len

    if device.type == "cuda":  # before anything is allocated: a warning rather than an out-of-memory error later
        world = ranks.world_size if ranks.sharded else 1
        ranks.on_main(lambda: report_plan(cfg, model_source, data.vocab_size, world, gpu_memory_gib(device), quiet),
                      share=False)
    model, source = build_model(model_source, data.vocab_size, cfg.seq_len, dtype, device, cfg.seed)
    return model, data, identity, train_data, val, source


def _open_run(run: _Run, ckpt: str | None, overwrite: bool) -> MetricsLog:
    """Make ``out_dir`` the run's: with ``overwrite`` the files of the run there deleted first; on resume the
    history kept up to the checkpoint and the leftovers of a killed run removed; ``config.json`` written.
    Returns the metrics log to append to."""
    cfg = run.cfg
    if overwrite:
        clear_run(cfg.out_dir)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # the history up to the checkpoint (a damaged line in it is an error, before anything else changes)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), truncate_after_step=run.start)
    if ckpt is not None:
        remove_leftovers(cfg.out_dir)
        prune_checkpoints(cfg.out_dir, cfg.keep_last, run.start)
    write_run(cfg.out_dir, cfg, run.run_id, run.identity)
    return log


def _describe(run: _Run) -> str:
    cfg, data, ranks = run.cfg, run.data, run.ranks
    where = f"device {run.device}"
    if ranks.sharded:
        where = (f"FSDP over {ranks.world_size} rank{'s' if ranks.world_size != 1 else ''} ({run.device.type}, "
                 f"{cfg.batch_size // ranks.world_size} rows of each batch per rank)")
    size = (f"{len(data.images.train)} train records" if run.vlm else
            f"{human_count(data.n_train_tokens)} train tokens")
    recipe = cfg.recipe + (" with FP8 attention inputs" if cfg.fp8_attention else "")
    return (f"{run.source}: {human_count(run.n_params)} params, recipe {recipe}, optimizer {cfg.optimizer}, "
            f"{'bf16' if _param_dtype(cfg) == torch.bfloat16 else 'fp32'} params, {where}, data "
            f"{data.source} ({size}), {cfg.steps} steps of {human_count(run.tokens_per_step)} tokens")


def _train_steps(run: _Run, state: dict, log: MetricsLog | None, progress: Progress | None
                 ) -> tuple[_Tracking, float | None]:
    """Steps ``run.start`` to ``cfg.steps``: a metrics record at log steps, the validation loss at evaluation
    steps, a checkpoint at save steps and at the last step (``log`` and ``progress`` are None on ranks other
    than 0). Returns what was tracked and the last validation loss."""
    cfg = run.cfg
    batches = run.train_batches()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    last = state.get("last", {})
    tracking = _Tracking.restore(state, run.device)
    val_loss = last.get("val_loss") if last.get("step") == run.start else None
    t_log, steps_since = time.time(), 0
    for step in range(run.start, cfg.steps):
        lr = lr_at(step, lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
        loss_sum, grad_norm = _step(run, batches, lr)
        done = step + 1
        tracking.record(done, loss_sum / cfg.grad_accum, grad_norm, cfg.max_nonfinite_streak)
        steps_since += 1
        is_eval = (cfg.eval_every > 0 and done % cfg.eval_every == 0) or done == cfg.steps
        if done % cfg.log_every == 0 or is_eval or done == run.start + 1:
            last = _metrics(run, tracking, done, loss_sum, lr, grad_norm, steps_since, t_log)
            if is_eval:
                last["val_loss"] = val_loss = evaluate(run)
            if log is not None:
                log.write(last)
            if progress:
                progress.update(done, loss=last["loss"], val_loss=last.get("val_loss"), lr=lr,
                                tok_per_s=last["tok_per_s"], mem_gib=last.get("mem_gib"),
                                nonfinite=nonfinite_note(last["nonfinite_grad_steps"],
                                                         last.get("nonfinite_grad_elements")))
            t_log, steps_since = time.time(), 0
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            _checkpoint(run, tracking, last, done)
    return tracking, val_loss


def _step(run: _Run, batches, lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step at learning rate ``lr`` on ``grad_accum`` micro-batches from ``batches``. Returns the
    sum of their losses and the gradient norm (None with step-in-backward, which updates inside backward) as
    device tensors: no host sync."""
    cfg, optimizer = run.cfg, run.optimizer
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # optimizers that keep lr on device expect it updated in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        loss = run.loss(next(batches))
        last_micro = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if run.in_backward is None or last_micro else run.in_backward.accumulating():
            (loss / cfg.grad_accum).backward()  # with step-in-backward, the last one also updates
        loss_sum += loss.detach()
    loss_sum = run.ranks.mean(loss_sum)  # sharded: the mean over the ranks, the loss of the whole batches
    grad_norm = None  # with step-in-backward the update happened inside backward
    if run.in_backward is None:
        grad_norm = clip_gradients(run.model, cfg.grad_clip)  # --grad-clip 0: the norm is only measured
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cfg.fp8_all_gather:  # the next gathers' scales: the amaxes the step recorded, one all-reduce
        precompute_fp8_scales(run.model, optimizer if isinstance(optimizer, AdamW) else None)
    return loss_sum, grad_norm


def _metrics(run: _Run, tracking: _Tracking, step: int, loss_sum: torch.Tensor, lr: float,
             grad_norm: torch.Tensor | None, steps_since: int, t_log: float) -> dict:
    """The metrics record of ``step`` (``steps_since`` steps after the record made at time ``t_log``): the host
    sync of the step; NonFiniteError if a loss so far was not finite."""
    cfg = run.cfg
    train_loss = loss_sum.item() / cfg.grad_accum  # the host sync of this step
    _stop_if_diverged(tracking, cfg)
    elapsed = time.time() - t_log
    record = {"step": step, "loss": train_loss, "lr": lr,
              "grad_norm": None if grad_norm is None else float(grad_norm),
              **tracking.counts(run.optimizer, run.ranks),
              "tokens": step * run.tokens_per_step, "tok_per_s": steps_since * run.tokens_per_step / elapsed}
    if run.device.type == "cuda":
        record["mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return record


def _checkpoint(run: _Run, tracking: _Tracking, last: dict, step: int) -> None:
    """Write checkpoint ``step`` (then prune older ones): the model, the optimizer and what a resume needs to
    continue exactly (``last``: the latest metrics record). NonFiniteError, writing nothing, if the run
    diverged."""
    cfg = run.cfg
    _check_before_save(tracking, cfg, run.model, run.optimizer, step)
    saved = {"run_id": run.run_id, "config": cfg.to_dict(), "data_identity": run.identity, "last": last,
             "recent_losses": torch.stack(list(tracking.recent)).tolist(),
             **tracking.counts(run.optimizer, run.ranks)}
    if run.ranks.sharded:
        save_sharded_checkpoint(cfg.out_dir, step, run.model, run.optimizer, saved, run.data.tokenizer_path,
                                run.ranks)
    elif run.vlm:  # the processor (tokenizer, image processor, chat template) goes with the model
        save_checkpoint(cfg.out_dir, step, run.model, run.optimizer, saved, None, processor=run.data.processor)
    else:
        save_checkpoint(cfg.out_dir, step, run.model, run.optimizer, saved, run.data.tokenizer_path)
    run.ranks.on_main(lambda: prune_checkpoints(cfg.out_dir, cfg.keep_last, step))


def _resume_point(cfg: TrainConfig) -> tuple[str, str, dict]:
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


def _model_source(cfg: TrainConfig, ckpt: str | None) -> str:
    """What the model is built from: ``--model``, except on resume of a run whose ``--model`` is a checkpoint
    folder (fine-tuning) or no longer exists: then the checkpoint to resume, which holds the architecture."""
    preset = cfg.model in PRESETS or cfg.model in VLM_PRESETS
    if ckpt is not None and not preset and (is_checkpoint_dir(cfg.model) or not os.path.exists(cfg.model)):
        return ckpt
    return cfg.model


def _tokenizer(cfg: TrainConfig, ckpt: str | None) -> str:
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
    """Load checkpoint ``path`` into ``model`` and ``optimizer``, sharded over any number of ranks or not,
    whether a sharded run or a run of one process wrote it; returns its step. ValueError if it holds non-finite
    values."""
    if is_sharded_checkpoint(path):
        step = load_sharded_checkpoint(path, model, optimizer)["step"]
    elif any(is_sharded(p) for p in model.parameters()):  # a checkpoint of one process, resumed sharded
        step = load_into_shards(path, model, optimizer)["step"]
    else:
        step = load_checkpoint(path, model, optimizer)["step"]
    bad = first_non_finite(model, optimizer)
    if bad is not None:
        raise ValueError(f"checkpoint {path} holds non-finite values ({bad}): it was written after its run "
                         "diverged; remove it to resume from an earlier checkpoint")
    return step


def _finished_summary(cfg: TrainConfig, step: int, label: str) -> dict | None:
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


def _stop_if_diverged(tracking: _Tracking, cfg: TrainConfig) -> None:
    """NonFiniteError if a training loss was not finite, or if the gradient norm was NaN or inf in
    ``cfg.max_nonfinite_streak`` consecutive steps (every one skipped: the weights stopped changing)."""
    # the first step whose loss was not finite, and the step where the streak reached its limit (0: none); one sync
    first, stuck = torch.stack([tracking.diverged, tracking.stuck]).tolist()
    if first:
        raise NonFiniteError(f"the training loss became non-finite at step {first}: the run diverged (lower --lr, "
                             f"or check the data); stopped without writing a checkpoint after it"
                             f"{_newest(cfg.out_dir)}")
    if stuck:
        n = cfg.max_nonfinite_streak
        raise NonFiniteError(f"the gradient norm was NaN or inf in {n} consecutive steps ({stuck - n + 1} to "
                             f"{stuck}): each was skipped, so the weights stopped changing and the run is stuck "
                             f"(lower --lr, train with fp32 weights or bf16 autocast, or check the data; "
                             f"--max-nonfinite-streak sets how many such steps stop a run); stopped without "
                             f"writing a checkpoint after them{_newest(cfg.out_dir)}")


def _check_before_save(tracking: _Tracking, cfg: TrainConfig, model, optimizer, step: int) -> None:
    _stop_if_diverged(tracking, cfg)
    bad = first_non_finite(model, optimizer)
    if bad is not None:
        raise NonFiniteError(f"{bad} became non-finite at step {step}: the run diverged (lower --lr, or check the "
                             f"data); stopped without writing its checkpoint{_newest(cfg.out_dir)}")


def _newest(out_dir: str) -> str:
    path = latest_checkpoint(out_dir)
    return f" (the newest checkpoint is {path})" if path else ""


def _finish(run: _Run, tracking: _Tracking, val_loss: float | None) -> dict:
    """The run's summary, also written to ``<out_dir>/summary.json`` (by rank 0; every rank returns it). Sharded,
    the optimizer's state is counted over all ranks and the peak memory is rank 0's."""
    cfg, model, device, ranks = run.cfg, run.model, run.device, run.ranks
    recent = tracking.recent
    summary = {
        "recipe": cfg.recipe, "optimizer": cfg.optimizer, "params": run.n_params, "steps": cfg.steps,
        "final_train_loss": float(torch.stack(list(recent)).mean()) if recent else None,  # the last FINAL_WINDOW
        "final_val_loss": val_loss,
        "tok_per_s": None,
        "optimizer_state_bytes": ranks.sum_int(optimizer_state_bytes(run.optimizer)),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "fp8_weight_copy_bytes": sum(c.nbytes for c in weight_caches(model)),
    }
    if device.type == "cuda":
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # read before the count below
    if run.vlm:  # counted exactly, for one micro-batch: vision side and LM apart
        summary.update(vlm_run.saved_bytes(model, run.val[0], run.autocast))
    elif not ranks.sharded:  # counted exactly: bytes the decoder keeps for backward for one micro-batch
        model.train()
        body = getattr(model, "model", model)  # HF causal LMs: the decoder without the LM head and the loss
        ids = run.val[0][:, :-1].to(device)
        _, saved = measure_saved_tensors(lambda: body(input_ids=ids, use_cache=False).last_hidden_state,
                                         modules=model)
        summary["saved_activation_bytes"] = saved.total_bytes
    if run.vlm and cfg.caption_eval:
        summary["caption_exact_match"] = vlm_run.caption_exact_match(model, run.data, cfg.caption_eval)
    summary["final_train_window"] = len(recent)
    summary.update(tracking.counts(run.optimizer, ranks))

    def write() -> dict:
        history = MetricsLog.read(os.path.join(cfg.out_dir, "metrics.jsonl"))
        speeds = [r["tok_per_s"] for r in history[1:] if "tok_per_s" in r]
        summary["tok_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else None
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary

    return ranks.on_main(write)
