"""The memory plan ``fp8coat train`` prints before it builds the model on a GPU, and its warning.

:func:`run_plan` turns a run's configuration into :class:`~fp8coat.memory.plan.PlanSettings` (the same options
``fp8coat plan`` takes) and predicts the peak memory per GPU; :func:`plan_lines` words it against the GPU's memory:
one line with the predicted peak, its largest parts and the largest ``--batch-size`` that fits, and a warning when
the predicted peak does not fit (before the run allocates anything, rather than an out-of-memory error after it).
"""

from __future__ import annotations

import sys

from ..memory.model_shape import ModelShape
from ..memory.plan import GIB, MemoryPlan, PlanSettings, max_batch, plan_memory
from .config import TrainConfig
from .presets import PRESETS, model_config
from .vlm_run import is_vlm

__all__ = ["gpu_memory_gib", "run_plan", "plan_lines", "report_plan"]


# the share of a GPU's total memory a run's tensors can take: the rest holds the CUDA context, library workspaces
# and what the caching allocator reserves above the allocated peak (on an H200, the full Llama-2-7B at batch 22
# reserved 135.2 GiB for a 130.7 GiB peak, and batch 23, planned at 134.8 GiB, ran out of its 140.4 GiB)
USABLE_FRACTION = 0.95


def gpu_memory_gib(device=None) -> "float | None":
    """The memory a run's tensors can take on CUDA ``device`` (default: the current one): its total memory times
    :data:`USABLE_FRACTION`, in GiB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()
                                             ).total_memory
    return total / GIB * USABLE_FRACTION


def run_plan(cfg: TrainConfig, model: str, vocab_size: int, world_size: int = 1
             ) -> "tuple[ModelShape, PlanSettings, MemoryPlan]":
    """The plan of ``cfg`` for ``model`` (``--model``, or the checkpoint a run resumes from; read as
    :func:`~fp8coat.train.presets.model_config` reads it, no weights loaded) with the tokenizer's ``vocab_size``
    (a preset's vocabulary; a config's is widened to it, as the trainer builds the model), sharded over
    ``world_size`` ranks when > 1. ValueError for models the planner does not know (it plans Llama-family
    decoders)."""
    if is_vlm(model):
        raise ValueError(f"{model} is a vision-language model; the planner plans text-only decoders")
    config = dict(model_config(model))
    vocab = vocab_size if model in PRESETS else max(vocab_size, int(config.get("vocab_size") or 0))
    shape = ModelShape.from_config(config, vocab_size=vocab)
    settings = PlanSettings(
        batch=cfg.batch_size, seq=cfg.seq_len, recipe=cfg.recipe, optimizer=cfg.optimizer,
        master_weights=cfg.master_weights, gpus=world_size, step_in_backward=cfg.step_in_backward,
        chunked_loss=cfg.chunked_loss, cache_fp8_weights=cfg.cache_fp8_weights, grad_accum=cfg.grad_accum,
        fp8_attention=cfg.fp8_attention,
        activation_checkpointing=cfg.activation_checkpointing,
        compiled=cfg.compile, expansion=cfg.expansion, device="cuda",
    )
    return shape, settings, plan_memory(shape, settings)


def plan_lines(shape: ModelShape, settings: PlanSettings, plan: MemoryPlan, gpu_gib: float
               ) -> "tuple[str, str | None]":
    """``(summary, warning or None)`` for a GPU of ``gpu_gib`` GiB: the predicted peak per GPU, its three largest
    parts and the largest batch that fits; the warning when the peak exceeds the GPU's memory."""
    parts = sorted(((name, nbytes) for name, nbytes in plan.rows() if nbytes > 0), key=lambda kv: -kv[1])[:3]
    fits = max_batch(shape, settings, gpu_gib)
    summary = (f"memory plan: predicted peak {plan.peak / GIB:.1f} GiB per GPU of {gpu_gib:.1f} usable GiB ("
               + ", ".join(f"{_short(name)} {nbytes / GIB:.1f}" for name, nbytes in parts)
               + f"); the largest --batch-size that fits: {fits or 'none'} (details: fp8coat plan)")
    if plan.peak <= gpu_gib * GIB:
        return summary, None
    advice = [f"--batch-size {fits} (with --grad-accum to keep the tokens per step)" if fits else
              "a smaller model or more GPUs (no batch fits)"]
    if not settings.step_in_backward and settings.optimizer == "fp8coat":
        advice.append("--step-in-backward (no gradients held; needs --grad-clip 0)")
    if settings.cache_fp8_weights and settings.recipe != "bf16":
        advice.append("--no-cache-fp8-weights")
    if not settings.chunked_loss:
        advice.append("--chunked-loss")
    warning = (f"fp8coat train: warning: the predicted peak memory, {plan.peak / GIB:.1f} GiB per GPU, exceeds the "
               f"{gpu_gib:.1f} GiB this GPU can hold: the run is likely to run out of memory. Try " + "; ".join(advice)
               + " (fp8coat plan shows the breakdown).")
    return summary, warning


def _short(row_name: str) -> str:
    """``activations saved for backward (32 layers x …)`` → ``activations saved for backward``."""
    return row_name.split(" (")[0]


def report_plan(cfg: TrainConfig, model: str, vocab_size: int, world_size: int, gpu_gib: float,
                quiet: bool = False) -> None:
    """Print the plan's summary (unless ``quiet``) and, on stderr, its warning; a model the planner does not know
    gets a one-line note instead."""
    try:
        shape, settings, plan = run_plan(cfg, model, vocab_size, world_size)
    except ValueError as err:
        if not quiet:
            print(f"memory plan: none for this model ({err})", flush=True)
        return
    summary, warning = plan_lines(shape, settings, plan, gpu_gib)
    if not quiet:
        print(summary, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
