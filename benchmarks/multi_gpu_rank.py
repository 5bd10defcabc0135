"""One throughput measurement of :mod:`benchmarks.multi_gpu`, run by every rank of one ``torchrun`` launch.

``python -m torch.distributed.run --standalone --nproc_per_node=N -m benchmarks.multi_gpu_rank SPEC.json``: each
rank joins the process group as ``fp8coat train --fsdp`` does (:func:`fp8coat.train.distributed.start_ranks`:
NCCL with ``cuda:LOCAL_RANK``, gloo on the CPU), builds the spec's model and variant, runs warm-up and timed
training steps on fresh random tokens (each rank its own), and rank 0 writes the result JSON (``spec["result"]``)
with the slowest rank's median step time and the largest per-rank peak memory.

Variants (``VARIANTS``), all sharded by :func:`fp8coat.train.fsdp.shard_model` (each decoder layer, then the root
that computes the loss; ``MixedPrecisionPolicy`` with bf16 parameters), their optimizer made by
``fp8coat.train.loop._make_optimizer`` (weight decay on matrices, as the trainer). With ``compile`` each decoder
layer is compiled: in place after sharding by ``fp8coat.train.loop._compile`` (``fp8coat.compile_layers``, as
``fp8coat train --compile``) for ``coat``, ``coat_fp8_gather`` and ``bf16``; for ``torchao_fp8`` each layer is
replaced by its ``torch.compile`` wrapper before sharding, as torchtitan does with torchao float8 (and as the
one-GPU anchor does). Dynamo may compile each HF decoder layer apart (it guards on ``layer_idx``): the recompile
limit is raised to 64, so that no layer falls back to eager.

* ``coat`` / ``coat_fp8_gather``: ``fp8coat train --fsdp`` (``--fp8-all-gather``) as it builds it: bf16
  parameters, ``fp8coat.convert(model, "coat")``, ``fp8coat.AdamW`` (bf16 + remainder masters), chunked loss,
  gradients averaged in bf16; with FP8 all-gather ``fp8coat.precompute_fp8_scales(model, opt)`` after each step.
* ``bf16``: ``fp8coat train --recipe bf16 --optimizer torch --fsdp-reduce-fp32 --no-chunked-loss``: fp32
  parameters, bf16 autocast, fused ``torch.optim.AdamW``, gradients averaged in fp32, full logits.
* ``torchao_fp8``: fp32 parameters, torchao ``convert_to_float8_training`` (``lm_head`` left out) with
  ``Float8LinearConfig(enable_fsdp_float8_all_gather=True)`` where the installed torchao has that field and
  ``precompute_float8_dynamic_scale_for_fsdp`` after each step, bf16 autocast, full logits, gradients averaged in
  fp32, ``torchao.optim.AdamWFp8`` — or fused ``torch.optim.AdamW`` when one step of ``AdamWFp8`` on a sharded
  (DTensor) test parameter fails; ``optimizer`` in the result says which, and why.

Every step clips the gradients' global norm to 1.0 (``fp8coat.train.loop.clip_gradients``, the trainer's
default). Peak memory (``torch.cuda.max_memory_allocated``) is counted from after the build (the model, sharded,
and the optimizer); ``build_peak_gib`` is the build's own peak: every rank first builds the whole model on its GPU
(as ``fp8coat train`` does: no meta-device init), 2 bytes per parameter in bf16 (13.5 GB for Llama-2-7B), 4 in
fp32 (27 GB), before sharding it.

An out-of-memory error on a rank writes ``oom_rank<R>.txt`` next to the result and ends that process at once
(exit code 3); torchrun then stops the other ranks, which may be waiting for it in a collective. ``fake_oom`` (the
dry run's test of that path) raises a simulated out-of-memory error on the last rank in the first step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from benchmarks import harness, llama7b
from fp8coat.conversion import convert
from fp8coat.nn.fp8_all_gather import precompute_fp8_scales
from fp8coat.recipe import get_recipe
from fp8coat.train import TrainConfig, loop
from fp8coat.train.chunked_loss import can_chunk_loss
from fp8coat.train.distributed import start_ranks, stop_ranks
from fp8coat.train.fsdp import Objective, shard_model
from fp8coat.train.presets import build_model

GIB = 2**30
LR = 1e-5
GRAD_CLIP = 1.0  # fp8coat train's default
OOM_EXIT = 3
VARIANTS = ("bf16", "torchao_fp8", "coat", "coat_fp8_gather")


@dataclasses.dataclass
class Trainer:
    """A built variant: ``objective(ids)`` is the loss (the FSDP root), ``after_step()`` runs after each optimizer
    step (the FP8 all-gather scales)."""

    model: torch.nn.Module
    objective: torch.nn.Module
    opt: torch.optim.Optimizer
    after_step: object
    optimizer_name: str
    notes: list


def train_config(variant: str, compiled: bool):
    """The ``TrainConfig`` whose settings ``fp8coat train`` would build ``variant`` with (torchao: the optimizer
    settings only)."""
    common = {"lr": LR, "compile": compiled, "grad_clip": GRAD_CLIP, "fsdp": "on"}
    if variant in ("coat", "coat_fp8_gather"):
        return TrainConfig(recipe="coat", fp8_all_gather=variant == "coat_fp8_gather", **common)
    if variant == "bf16":
        return TrainConfig(recipe="bf16", optimizer="torch", fsdp_reduce_fp32=True, chunked_loss=False, **common)
    if variant == "torchao_fp8":
        return TrainConfig(recipe="bf16", optimizer="torchao-fp8", fsdp_reduce_fp32=True, chunked_loss=False,
                           **common)
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def adamwfp8_refusal(device: torch.device) -> str | None:
    """Why ``torchao.optim.AdamWFp8`` cannot step a parameter sharded by ``fully_shard`` here (its error), or
    None when one step works. The test parameter (256 × 256) is large enough for FP8 states."""
    from torch.distributed.fsdp import fully_shard
    from torchao.optim import AdamWFp8

    lin = torch.nn.Linear(256, 256, bias=False, device=device)
    fully_shard(lin)
    opt = AdamWFp8(lin.parameters(), lr=LR)
    try:
        lin(torch.ones(4, 256, device=device)).sum().backward()
        opt.step()
        return None
    except Exception as ex:  # noqa: BLE001 - any failure means: use torch's AdamW, and say why
        return f"{type(ex).__name__}: {str(ex)[:300]}"


def torchao_float8(model: torch.nn.Module) -> tuple[bool, list[str]]:
    """torchao float8 training on every linear but the LM head; returns (FP8 all-gather on, notes)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    fields = {f.name for f in dataclasses.fields(Float8LinearConfig)}
    gather = "enable_fsdp_float8_all_gather" in fields
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=True) if gather else Float8LinearConfig()
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: "lm_head" not in fqn, config=config)
    return gather, [] if gather else ["this torchao's Float8LinearConfig has no enable_fsdp_float8_all_gather: "
                                      "weights gathered in bf16"]


def build(spec: dict, device: torch.device) -> Trainer:
    """The model of ``spec`` converted, sharded, compiled (``spec["compile"]``) and its optimizer."""
    variant = spec["variant"]
    cfg = train_config(variant, spec["compile"])
    dtype = loop._param_dtype(cfg)
    model, _ = build_model(spec["model_config"], spec["vocab"], spec["seq"], dtype, device, seed=0)
    notes, torchao_gather = [], False
    if variant == "torchao_fp8":
        torchao_gather, notes = torchao_float8(model)
        if cfg.compile:  # torchtitan's order: each layer's torch.compile wrapper, then fully_shard of the wrappers
            layers = model.model.layers
            for i, layer in enumerate(layers):
                layers[i] = torch.compile(layer)
    else:
        model = convert(model, get_recipe(cfg.recipe))
    model.train()
    autocast = dtype == torch.float32
    chunked = cfg.chunked_loss and can_chunk_loss(model)
    objective = shard_model(model, Objective(model, loop._loss, autocast, chunked), cfg.fsdp_reduce_fp32,
                            cfg.fp8_all_gather)
    optimizer_name = {"fp8coat": "fp8coat.AdamW", "torch": "torch.optim.AdamW (fused on CUDA)"}.get(cfg.optimizer)
    if variant == "torchao_fp8":
        refusal = adamwfp8_refusal(device)
        optimizer_name = "torchao.optim.AdamWFp8"
        if refusal is not None:
            cfg = dataclasses.replace(cfg, optimizer="torch")
            optimizer_name = ("torch.optim.AdamW (fused on CUDA): torchao AdamWFp8 failed on a sharded parameter: "
                              f"{refusal}")
    opt = loop._make_optimizer(cfg, model)
    after_step = lambda: None
    if cfg.fp8_all_gather:
        after_step = lambda: precompute_fp8_scales(model, opt)
    elif torchao_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        after_step = lambda: precompute_float8_dynamic_scale_for_fsdp(model)
    if cfg.compile and variant != "torchao_fp8":
        loop._compile(model, objective)
    return Trainer(model, objective, opt, after_step, optimizer_name, notes)


def train_step(tr: Trainer, ids: torch.Tensor) -> torch.Tensor:
    """Forward (the loss), backward, clipping, optimizer step and ``after_step``; the detached loss."""
    loss = tr.objective(ids)
    loss.backward()
    loop.clip_gradients(tr.model, GRAD_CLIP)
    tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)
    tr.after_step()
    return loss.detach()


def profile_step(tr: Trainer, ids: torch.Tensor, rank: int, cuda: bool) -> dict | None:
    """One more step, under ``torch.profiler`` on rank 0 (the others run it plainly: the collectives need every
    rank); rank 0 returns the summary of :func:`benchmarks.llama7b.summarize_items`."""
    from torch.profiler import ProfilerActivity, profile

    harness.sync(ids.device)
    if rank != 0:
        train_step(tr, ids)
        harness.sync(ids.device)
        return None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall_ms = harness.time_ms(lambda: train_step(tr, ids), ids.device, 0, 1)["ms"]
    return llama7b.summarize_items(llama7b.profile_items(prof, cuda), wall_ms, llama7b.fp8coat_kernel_names(),
                                   "cuda" if cuda else "cpu")


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise maximum of ``values`` over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(spec: dict, rank: int, world: int, device: torch.device) -> dict:
    """Build, warm up, time; the result of this rank (the caller combines the ranks)."""
    cuda = device.type == "cuda"
    harness.sync(device)
    t0 = time.perf_counter()
    tr = build(spec, device)
    harness.sync(device)
    build_s = time.perf_counter() - t0
    build_peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.reset_accumulated_memory_stats(device)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # fresh tokens every step, each rank its own
    batch, seq, vocab = spec["batch"], spec["seq"], spec["vocab"]
    out = {"loss": None}

    def step():
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=gen)
        out["loss"] = train_step(tr, ids)

    if spec.get("fake_oom") and rank == world - 1:
        raise torch.OutOfMemoryError("simulated out-of-memory error (dry run)")
    t1 = time.perf_counter()
    step()  # the first step: compilation, lazy optimizer state
    harness.sync(device)
    first_step_s = time.perf_counter() - t1
    timing = harness.time_ms(step, device, spec["warmup"] - 1, spec["steps"])
    loss = float(out["loss"])
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved(device) / GIB if cuda else 0.0
    retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if cuda else 0
    step_ms, first_step_s, build_s, peak, build_peak, reserved, retries = max_over_ranks(
        [timing["ms"], first_step_s, build_s, peak, build_peak, reserved, retries], device)
    result = {"step_ms": round(step_ms, 2), "step_ms_min": round(timing["ms_min"], 2),
              "step_ms_max": round(timing["ms_max"], 2),
              "tok_s_per_gpu": round(batch * seq / step_ms * 1e3, 1), "first_step_s": round(first_step_s, 2),
              "build_s": round(build_s, 2), "loss": round(loss, 4), "optimizer": tr.optimizer_name,
              "notes": tr.notes, "chunked_loss": bool(getattr(tr.objective, "_chunked", False)),
              "params": sum(p.numel() for p in tr.model.parameters())}
    if cuda:
        result.update(peak_gib=round(peak, 2), build_peak_gib=round(build_peak, 2), reserved_gib=round(reserved, 2),
                      alloc_retries=int(retries))
    if spec.get("profile"):
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=gen)
        summary = profile_step(tr, ids, rank, cuda)
        if summary is not None:
            summary.update(step_ms_unprofiled=result["step_ms"], batch=batch, seq=seq, gpus=world)
            result["profile"] = summary
    return result


def is_oom(ex: BaseException) -> bool:
    """An out-of-memory error, also one raised inside compilation (wrapped in a compiler error)."""
    return isinstance(ex, torch.OutOfMemoryError) or "out of memory" in str(ex).lower()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    ranks, device = start_ranks("on", spec["device"])
    here = os.path.dirname(spec["result"])
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    try:
        with torch._dynamo.config.patch(**{limit: 64}):
            result = measure(spec, ranks.rank, ranks.world_size, device)
    except Exception as ex:  # noqa: BLE001 - recorded for the driver, then this process ends
        name = "oom" if is_oom(ex) else "error"
        with open(os.path.join(here, f"{name}_rank{ranks.rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        print(f"rank {ranks.rank}: {name}: {ex!r}"[:2000], flush=True)
        # no teardown: the other ranks may wait in a collective; torchrun stops them once this process is gone
        os._exit(OOM_EXIT if name == "oom" else 1)
    if ranks.is_main:
        result.update(gpus=ranks.world_size, device=str(device), variant=spec["variant"], batch=spec["batch"],
                      seq=spec["seq"])
        with open(spec["result"] + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(spec["result"] + ".tmp", spec["result"])
        print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    stop_ranks(ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
