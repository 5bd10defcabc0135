"""Full Llama-2-7B training on one GPU: fp8coat against torchao float8 and BF16 AMP, measured in the same process.

The model is the HF ``LlamaForCausalLM`` at the Llama-2-7B shape (hidden 4096, 32 layers, 32 heads (MHA), MLP
11008, vocab 32000; 6.74 B parameters), random init, sdpa attention, ``use_cache=False``, built directly on the GPU
in its parameter dtype (bf16 for fp8coat rows, fp32 for the anchors). Every step draws fresh random tokens
(batch × seq int64). A *row* is one training configuration; each row runs at its batch sizes in ascending order
until one runs out of memory (the rest of that row is skipped). Every (row, batch) run builds a fresh model and
releases everything afterwards (``torch._dynamo.reset()``, gc, ``empty_cache``; the memory still allocated is
logged and kept under ``memory`` in the JSON), so compiled code is never shared between runs and every compiled
run has static shapes.

Rows (``ROWS``; the fp8coat ones come from :func:`fp8coat_row`, whose arguments are the configuration pieces):

* ``fp8coat_best``: bf16 parameters, ``fp8coat.convert(model, "coat")`` (the recipe's defaults: no FP8 weight
  copies kept, each weight quantized in every forward), ``fp8coat.compile_layers`` on the decoder layers,
  ``fp8coat.AdamW(master_weights="bf16-stochastic")`` stepped inside backward by ``fp8coat.StepInBackward`` (no
  gradients kept), LM head + loss through ``fp8coat.ops.cross_entropy.linear_cross_entropy`` (chunked; no fp32
  logits).
* ``fp8coat_exact``: the same with ``master_weights="bf16-remainder"`` and the usual
  ``loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)``.
* ``fp8coat_best_cache`` / ``fp8coat_exact_cache``: the same two with
  ``get_recipe("coat").with_options(cache_fp8_weights=True)``: each converted linear keeps its weight's FP8 copy
  between optimizer steps, 1 byte per weight (fails with a message, and the row moves on, when the installed
  fp8coat's ``Recipe`` has no such field). Result files written before the cache was off by default name the
  cached rows ``fp8coat_best`` / ``fp8coat_exact`` and the uncached ones ``*_nocache``; every row records the
  value it ran with under ``cache_fp8_weights``.
* ``fp8coat_best_eager``: ``fp8coat_best`` without ``compile_layers``.
* ``fp8coat_best_after``: ``fp8coat_best`` with the usual ``opt.step()`` after backward instead of the update
  inside it (what stepping inside backward costs or saves in time, at the memory of the kept gradients).
* ``torchao_fp8_compiled_adamwfp8``: as ``/work/shared/bench/anchors_7b.py``: fp32 parameters, torchao
  ``convert_to_float8_training`` (lm_head left out), ``torch.compile`` of each decoder layer,
  ``torchao.optim.AdamWFp8``, bf16 autocast around the forward. Skipped with a note when torchao is absent.
* ``bf16amp_compiled`` / ``bf16amp_eager``: fp32 parameters, bf16 autocast, per-layer ``torch.compile`` (or none),
  fused ``torch.optim.AdamW``.

Default plan (seq 2048; estimated 300-380 s on an H200, inside the default ``--budget-s 540``), in run order:
``fp8coat_best:16,20,24; torchao_fp8_compiled_adamwfp8:8,10; bf16amp_compiled:3; fp8coat_exact:16`` (each row
up to its first out-of-memory batch: the anchors fit torchao at 8, not 12, and BF16 at 3, not 4). At another
``--seq`` the default batches are scaled by 2048 / seq (same tokens per step). Per run: 2 warm-up steps (the first
compiles; fp8coat's second compiles the steady-state variant) and 3 timed steps (``--warmup``, ``--steps``).

Reported per (row, batch) in ``rows`` of ``<out>/llama7b.json`` (a list; keys ``ROW_KEYS``): ok / oom, median
step time over the timed steps (``step_ms``, CUDA events, synchronized after each step; host clock on the CPU),
``tok_s`` = batch · seq / step time, ``peak_gib`` = ``torch.cuda.max_memory_allocated`` / 2³⁰ from after the
build (parameters and optimizer count; None on the CPU), the final step's loss, ``wall_s`` (build + all steps),
``build_s`` (model on the GPU, conversion, compile wrappers, optimizer), ``first_step_s`` (host clock,
compilation included), ``allocated_before_gib`` (memory still allocated when the run started, which its peak
includes; 0 unless an earlier run left something behind), ``reserved_gib`` (``max_memory_reserved``: what the
caching allocator held at most) and ``alloc_retries`` (the allocator's ``num_alloc_retries`` since the build:
allocations that first failed and succeeded only after freeing cached blocks, each a device synchronization).
``recipe`` / ``optimizer`` / ``master_weights`` use the
names of ``fp8coat.memory.PlanSettings`` where it has them (``coat`` / ``bf16``, ``fp8coat`` / ``torch`` /
``torchao-fp8``, ``fp32`` for the anchors' fp32 parameters); torchao's recipe is ``torchao-float8``. ``meta``
records date, commit (``FP8COAT_COMMIT``), command, GPU and versions. The table printed last gives tok/s relative
to the best torchao and bf16amp_compiled batch measured in the same run.

Flags:

* ``--rows a,b`` rows to run (default above); ``--batches ROW:b1,b2[;ROW:...]`` (repeatable) sets a row's
  batches, and a row named only there is added to the run (e.g. ``--batches fp8coat_best_cache:16``).
* ``--seq 4096``; ``--budget-s S``: a run starts only while the elapsed time plus its estimated cost fits S (JSON
  saved after every run; SIGTERM stops cleanly); ``--no-compile``: every row eager.
* ``--profile ROW@BATCH`` (repeatable): after that run's timed steps, one more step under ``torch.profiler`` (CPU +
  CUDA); the top 25 kernels by self CUDA time and the step's time by category (FP8 GEMM, BF16 GEMM, attention, fp8coat
  Triton kernels by module, collectives (NCCL; none on one GPU), elementwise / other, idle = step wall − time the
  GPU was busy) are printed and appended to ``profiles`` (files written before ``--profile`` repeated hold one
  summary under ``profile``). The run is added to the plan if absent; e.g. ``--profile fp8coat_best@16 --profile
  fp8coat_exact@16`` shows the optimizer step inside backward (per parameter) and after it (one launch).
* ``--saved-bytes``: ``fp8coat.memory.measure_saved_tensors`` of one bf16 decoder layer's forward at
  (``--saved-batch``, seq, 4096) for the ``bf16`` and ``coat`` recipes (and ``coat_cache``: ``coat`` with
  ``cache_fp8_weights=True``, where that field exists): bytes saved for backward per op (and the FP8 weight
  copies held apart, ``weight_copy_bytes``), under ``saved_bytes``.
* ``--dry-run``: tiny shapes on the CPU (hidden 64, 2 layers, 4 heads, MLP 176, vocab 96, seq 32, batches 2 and
  4), no compilation, FP8 emulated by fp8coat's CPU path; torchao rows skipped.

Usage, from the repository root::

    python -m benchmarks.llama7b --out $OUT                                   # on one H200
    python -m benchmarks.llama7b --out $OUT --rows fp8coat_best --batches fp8coat_best:16 \\
        --profile fp8coat_best@16 --saved-bytes
    python -m benchmarks.llama7b --dry-run --out /tmp/llama7b                 # CPU, < 60 s
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import statistics
import sys
import time

import torch

from benchmarks import harness, provenance
from benchmarks.harness import fmt, log, sync

GIB = 2**30
LR = 1e-5  # as the anchor script
FULL_SHAPE = {"hidden": 4096, "layers": 32, "heads": 32, "ffn": 11008, "vocab": 32000}
DRY_SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "ffn": 176, "vocab": 96}
DRY_SEQ = 32
REF_SEQ = 2048  # the sequence length the default batches are for

ROW_KEYS = ("row", "recipe", "optimizer", "master_weights", "step_in_backward", "chunked_loss", "compiled",
            "cache_fp8_weights", "batch", "seq", "layers", "ok", "oom", "step_ms", "tok_s", "peak_gib", "loss",
            "wall_s", "build_s", "first_step_s", "allocated_before_gib", "reserved_gib", "alloc_retries")

TORCHAO_ROW = "torchao_fp8_compiled_adamwfp8"
BF16_ROW = "bf16amp_compiled"

# budget estimates for one run on an H200 (seconds; tokens per second by library)
BUILD_COST_S = 15.0
COMPILE_COST_S = 40.0
PROFILE_COST_S = 30.0  # the profiled step and the trace's post-processing
EST_TOK_S = {"fp8coat": 20_000, "torchao": 17_000, "bf16amp": 11_000}


@dataclasses.dataclass(frozen=True)
class Row:
    """One training configuration of the 7B model.

    ``library``: ``fp8coat`` (bf16 parameters, ``coat`` recipe, ``fp8coat.AdamW``), ``torchao`` (fp32 parameters,
    float8 linears, ``AdamWFp8``, bf16 autocast) or ``bf16amp`` (fp32 parameters, bf16 autocast, fused torch
    AdamW). ``master_weights``: ``fp8coat.AdamW``'s mode (``fp32`` for the anchors: their parameters are fp32).
    ``cache_fp8_weights``: passed to the recipe only when not None (None: the recipe's default)."""

    name: str
    library: str
    compiled: bool = True
    master_weights: str | None = None
    step_in_backward: bool = False
    chunked_loss: bool = False
    cache_fp8_weights: bool | None = None

    @property
    def optimizer(self) -> str:
        """``fp8coat`` (fp8coat.AdamW), ``torchao-fp8`` (torchao.optim.AdamWFp8) or ``torch`` (fused AdamW): the
        names of ``fp8coat.memory.PlanSettings``."""
        return {"fp8coat": "fp8coat", "torchao": "torchao-fp8", "bf16amp": "torch"}[self.library]

    @property
    def recipe(self) -> str:
        """``coat``, ``torchao-float8`` or ``bf16`` (with autocast: see :attr:`optimizer`)."""
        return {"fp8coat": "coat", "torchao": "torchao-float8", "bf16amp": "bf16"}[self.library]


def fp8coat_row(name: str, *, master: str = "bf16-stochastic", compiled: bool = True, in_backward: bool = True,
                chunked_loss: bool = True, cache_fp8_weights: bool | None = None) -> Row:
    """An fp8coat row: ``coat`` recipe on bf16 parameters; defaults are the ``fp8coat_best`` configuration."""
    return Row(name, "fp8coat", compiled=compiled, master_weights=master, step_in_backward=in_backward,
               chunked_loss=chunked_loss, cache_fp8_weights=cache_fp8_weights)


ROWS = {r.name: r for r in (
    fp8coat_row("fp8coat_best"),
    fp8coat_row("fp8coat_exact", master="bf16-remainder", in_backward=False),
    fp8coat_row("fp8coat_best_cache", cache_fp8_weights=True),
    fp8coat_row("fp8coat_exact_cache", master="bf16-remainder", in_backward=False, cache_fp8_weights=True),
    fp8coat_row("fp8coat_best_eager", compiled=False),
    fp8coat_row("fp8coat_best_after", in_backward=False),
    Row(TORCHAO_ROW, "torchao", master_weights="fp32"),
    Row(BF16_ROW, "bf16amp", master_weights="fp32"),
    Row("bf16amp_eager", "bf16amp", compiled=False, master_weights="fp32"),
)}

DEFAULT_ROWS = ("fp8coat_best", TORCHAO_ROW, BF16_ROW, "fp8coat_exact")
DEFAULT_BATCHES = {"fp8coat_best": (16, 20, 24), "fp8coat_exact": (16,), "fp8coat_best_cache": (16,),
                   "fp8coat_exact_cache": (16,), "fp8coat_best_eager": (16,), "fp8coat_best_after": (16,),
                   TORCHAO_ROW: (8, 10), BF16_ROW: (3,), "bf16amp_eager": (2,)}
DRY_BATCHES = {"fp8coat_best": (2, 4)}  # every other row: (2,)


class RowUnavailable(RuntimeError):
    """A row that cannot run with the installed packages (raised before any model is built)."""


# ---------------------------------------------------------------------------------------------------------------
# model, optimizer, step


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """``torch.set_default_dtype(dtype)`` inside the block: modules are created in ``dtype`` directly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def llama_config(shape: dict, seq: int):
    """HF ``LlamaConfig`` of ``shape`` (keys of ``FULL_SHAPE``), MHA, sdpa attention, no KV cache."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      vocab_size=shape["vocab"], max_position_embeddings=max(4096, seq), use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_llama(shape: dict, seq: int, dtype: torch.dtype, device) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` of ``shape`` created on ``device`` with ``dtype`` parameters (no fp32
    copy first; the rotary ``inv_freq`` buffers stay fp32), in training mode. Seeded (``torch.manual_seed(0)``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(llama_config(shape, seq))
    return model.train()


def coat_recipe(row: Row):
    """The ``coat`` recipe, with ``cache_fp8_weights`` set when the row asks for it; :class:`RowUnavailable` when
    the installed fp8coat's ``Recipe`` has no such field."""
    import fp8coat

    recipe = fp8coat.get_recipe("coat")
    if row.cache_fp8_weights is None:
        return recipe
    if "cache_fp8_weights" not in {f.name for f in dataclasses.fields(recipe)}:
        raise RowUnavailable(f"row {row.name} sets Recipe.cache_fp8_weights, which the installed fp8coat "
                             f"({fp8coat.__file__}) does not have")
    return recipe.with_options(cache_fp8_weights=row.cache_fp8_weights)


def check_row(row: Row, device) -> str | None:
    """Why ``row`` cannot run here (a note for ``skipped``), or None. Raises :class:`RowUnavailable` for a
    configuration the installed fp8coat lacks."""
    if row.library == "torchao":
        if torch.device(device).type != "cuda":
            return "torchao float8 needs a CUDA GPU"
        if importlib.util.find_spec("torchao") is None:
            return "torchao is not installed"
    if row.library == "fp8coat":
        coat_recipe(row)
    return None


@dataclasses.dataclass
class Trainer:
    """A built model and its optimizer; ``step_in_backward``: the ``fp8coat.StepInBackward`` (or None)."""

    row: Row
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step_in_backward: object | None
    amp: bool
    compiled: bool

    def close(self) -> None:
        if self.step_in_backward is not None:
            self.step_in_backward.remove()
            self.step_in_backward = None


def build(row: Row, shape: dict, seq: int, device, compiled: bool) -> Trainer:
    """The model, optimizer and hooks of ``row`` (``compiled`` = the row's flag and compilation allowed)."""
    if row.library == "fp8coat":
        import fp8coat

        recipe = coat_recipe(row)
        model = build_llama(shape, seq, torch.bfloat16, device)
        fp8coat.convert(model, recipe)
        if compiled:
            fp8coat.compile_layers(model.model.layers)
        opt = fp8coat.AdamW(model.parameters(), lr=LR, master_weights=row.master_weights)
        sib = fp8coat.StepInBackward(opt) if row.step_in_backward else None
        return Trainer(row, model, opt, sib, amp=False, compiled=compiled)
    model = build_llama(shape, seq, torch.float32, device)
    if row.library == "torchao":
        from torchao.float8 import convert_to_float8_training
        from torchao.optim import AdamWFp8

        convert_to_float8_training(model, module_filter_fn=lambda m, n: "lm_head" not in n)
    if compiled:  # as the anchor script: each decoder layer replaced by its torch.compile wrapper
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(layer)
    if row.library == "torchao":
        opt = AdamWFp8(model.parameters(), lr=LR)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=torch.device(device).type == "cuda")
    return Trainer(row, model, opt, None, amp=True, compiled=compiled)


def train_step(tr: Trainer, ids: torch.Tensor) -> torch.Tensor:
    """One training step on ``ids`` (batch, seq) int64: forward (bf16 autocast for the anchors), backward,
    optimizer step (inside backward for ``step_in_backward`` rows). Returns the detached 0-d loss."""
    model = tr.model
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=tr.amp):
        if tr.row.chunked_loss:
            from fp8coat.ops.cross_entropy import linear_cross_entropy

            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            loss = linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, ids[:, 1:])
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if tr.step_in_backward is None:
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------
# profile: where the step's time goes

PROFILE_TOP = 25
CATEGORIES = ("fp8_gemm", "bf16_gemm", "attention", "fp8coat_triton", "collectives", "elementwise_other")
# fp8coat's Triton kernels (module-level FastKernel objects named _*_kernel) by the module that defines them
FP8COAT_KERNEL_MODULES = {"fp8coat.quantization.triton_kernels": "quantize", "fp8coat.ops.norms_kernels": "norm",
                          "fp8coat.ops.activation_kernels": "activation",
                          "fp8coat.ops.recompute_kernels": "recompute",
                          "fp8coat.ops.cross_entropy_kernels": "cross_entropy", "fp8coat.optim.step_triton": "adamw"}


def fp8coat_kernel_names() -> dict[str, str]:
    """Kernel function name → fp8coat module label (``quantize``, ``norm``, ``activation``, ``recompute``,
    ``cross_entropy``, ``adamw``), from the modules that define them (none where Triton is absent)."""
    names = {}
    for module_name, label in FP8COAT_KERNEL_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in vars(module):
            if name.startswith("_") and name.endswith("_kernel"):
                names[name] = label
    return names


def categorize(name: str, parents: "tuple[str, ...] | list[str]", fp8coat_kernels: dict[str, str]) -> tuple[str, str]:
    """``(category, detail)`` of one kernel (or, on the CPU, one op) from its name and the names of the ops that
    launched it. Categories: ``CATEGORIES``; the detail is the fp8coat module label, or for
    ``elementwise_other``: ``inductor``, ``memcpy/memset`` or ``other``. ``collectives``: NCCL kernels (names
    containing ``nccl``), on the CPU the c10d / gloo ops (FSDP2's all-gathers and reduce-scatters)."""
    n = name.lower()
    p = " ".join(parents).lower()
    if "nccl" in n or n.startswith(("c10d::", "gloo:")):
        return "collectives", ""
    if "_scaled_mm" in p or "_scaled_mm" in n or any(s in n for s in ("e4m3", "e5m2", "fp8")):
        return "fp8_gemm", ""
    if any(s in n or s in p for s in ("flash", "fmha", "attention", "sdpa")):
        return "attention", ""
    gemm_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_addmm_activation")
    if (any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "gemv"))
            or any(op in p.split() for op in gemm_ops) or n in gemm_ops):
        return "bf16_gemm", ""
    base = name.split("(")[0].strip()
    if base in fp8coat_kernels:
        return "fp8coat_triton", fp8coat_kernels[base]
    if n.startswith("fp8coat::"):
        return "fp8coat_triton", n.split("::", 1)[1]
    if n.startswith("triton_"):
        return "elementwise_other", "inductor"
    if "memcpy" in n or "memset" in n:
        return "elementwise_other", "memcpy/memset"
    return "elementwise_other", "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (µs): the time at least one kernel ran."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize_items(items: list[dict], wall_ms: float, fp8coat_kernels: dict[str, str], device: str,
                    top: int = PROFILE_TOP) -> dict:
    """The profile summary from ``items`` (dicts ``name``, ``parents``, ``us`` and, for kernels, ``start`` /
    ``end`` in µs): the ``top`` names by total time (count, total ms, % of all kernel time, category, launching
    ops), ms per category and per fp8coat module, and idle = ``wall_ms`` − busy time (the union of kernel
    intervals where known, else the sum)."""
    by_name: dict[str, dict] = {}
    categories = dict.fromkeys(CATEGORIES, 0.0)
    details: dict[str, dict[str, float]] = {"fp8coat_triton": {}, "elementwise_other": {}}
    for it in items:  # each launch categorized with its own launching op
        cat, detail = categorize(it["name"], it["parents"], fp8coat_kernels)
        categories[cat] += it["us"] / 1e3
        if cat in details:
            details[cat][detail] = details[cat].get(detail, 0.0) + it["us"] / 1e3
        d = by_name.setdefault(it["name"], {"count": 0, "us": 0.0, "parents": set(), "categories": {}})
        d["count"] += 1
        d["us"] += it["us"]
        d["parents"].update(it["parents"])
        d["categories"][cat] = d["categories"].get(cat, 0.0) + it["us"]
    total_us = sum(d["us"] for d in by_name.values())
    top_rows = []
    for name, d in sorted(by_name.items(), key=lambda kv: -kv[1]["us"])[:top]:
        top_rows.append({"name": name[:300], "count": d["count"], "total_ms": d["us"] / 1e3,
                         "pct": 100.0 * d["us"] / total_us if total_us else 0.0,
                         "category": max(d["categories"], key=d["categories"].get), "ops": sorted(d["parents"])[:3]})
    spans = [(it["start"], it["end"]) for it in items if it.get("start") is not None]
    busy_ms = (busy_us(spans) if spans else total_us) / 1e3
    return {"device": device, "time": "self CUDA time of kernels" if device == "cuda" else "self CPU time of ops",
            "wall_ms": wall_ms, "kernel_sum_ms": total_us / 1e3, "busy_ms": busy_ms,
            "idle_gaps_ms": wall_ms - busy_ms, "categories_ms": categories,
            "categories_pct_of_wall": {k: 100.0 * v / wall_ms for k, v in categories.items()} if wall_ms else {},
            "fp8coat_triton_by_module_ms": details["fp8coat_triton"],
            "elementwise_other_ms": details["elementwise_other"], "top": top_rows}


def profile_items(prof, cuda: bool) -> list[dict]:
    """Per kernel (CUDA) or per op with self CPU time (CPU) of a finished ``torch.profiler.profile``."""
    from torch.autograd import DeviceType

    events = prof.events()
    if not cuda:
        return [{"name": e.name, "parents": (), "us": e.self_cpu_time_total} for e in events
                if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]
    # the CPU op that launched each kernel: kineto links a kernel to it by correlation id; where the event does not
    # carry that link, every op that launched a kernel of that name
    op_of_id, parents_of_name = {}, {}
    for e in events:
        if e.device_type == DeviceType.CPU and getattr(e, "kernels", None):
            op_of_id[e.id] = e.name
            for k in e.kernels:
                parents_of_name.setdefault(k.name, set()).add(e.name)
    items = []
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        op = op_of_id.get(getattr(e, "linked_correlation_id", None))
        parents = (op,) if op is not None else tuple(sorted(parents_of_name.get(e.name, ())))
        items.append({"name": e.name, "parents": parents, "us": e.time_range.elapsed_us(),
                      "start": e.time_range.start, "end": e.time_range.end})
    return items


def profile_table(summary: dict) -> str:
    """The profile summary as markdown: categories, then the top kernels."""
    wall = summary["wall_ms"]
    lines = [f"profile ({summary['time']}): step wall {wall:.1f} ms, kernels {summary['kernel_sum_ms']:.1f} ms, "
             f"busy {summary['busy_ms']:.1f} ms",
             "| category | ms | % of wall |", "|---|---|---|"]
    for cat, ms in summary["categories_ms"].items():
        lines.append(f"| {cat} | {ms:.2f} | {100 * ms / wall if wall else 0:.1f} |")
    lines.append(f"| idle / host gaps | {summary['idle_gaps_ms']:.2f} | "
                 f"{100 * summary['idle_gaps_ms'] / wall if wall else 0:.1f} |")
    for key in ("fp8coat_triton_by_module_ms", "elementwise_other_ms"):
        if summary[key]:
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary[key].items(),
                                                                                 key=lambda kv: -kv[1])))
    lines += ["", "| # | kernel | count | total ms | % | category | launched by |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(summary["top"], 1):
        lines.append(f"| {i} | {r['name'][:100]} | {r['count']} | {r['total_ms']:.2f} | {r['pct']:.1f} | "
                     f"{r['category']} | {', '.join(r['ops'])[:60]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping


def _round(v, nd: int):
    return None if v is None else round(v, nd)


class Bench(harness.Bench):
    """The runs of this benchmark; every (row, batch) runs under :meth:`run_row_batch`."""

    json_name = "llama7b.json"

    def __init__(self, args, meta: dict | None = None):
        config = {k: v for k, v in vars(args).items() if k not in ("plan", "sections")}
        config["plan"] = [[row.name, list(batches)] for row, batches in args.plan]
        config["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")  # the caching allocator's settings
        super().__init__(args, {"config": config, "rows": [], "errors": {}, "skipped": [], "memory": [],
                                "profiles": [], "saved_bytes": None}, meta)
        self.shape = DRY_SHAPE if args.dry_run else FULL_SHAPE

    # -- memory -----------------------------------------------------------------------------------------------

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / GIB if self.cuda else None

    def release(self, name: str) -> None:
        """Drop compiled code and free memory after a run; log and record what is still allocated."""
        torch._dynamo.reset()
        self.free()
        left = self.allocated_gib()
        self.res["memory"].append({"run": name, "allocated_after_gib": _round(left, 3)})
        if left is not None:
            log(f"  memory allocated after {name}: {left:.3f} GiB" + ("  (WARNING: not released)" if left > 0.5
                                                                       else ""))

    # -- one run ----------------------------------------------------------------------------------------------

    def entry(self, row: Row, batch: int, compiled: bool, cache_fp8_weights: bool | None) -> dict:
        """A ``rows`` entry with the configuration filled in and every measurement None."""
        e = dict.fromkeys(ROW_KEYS)
        e.update(row=row.name, recipe=row.recipe, optimizer=row.optimizer, master_weights=row.master_weights,
                 step_in_backward=row.step_in_backward, chunked_loss=row.chunked_loss, compiled=compiled,
                 cache_fp8_weights=cache_fp8_weights, batch=batch, seq=self.args.seq, layers=self.shape["layers"],
                 ok=False, oom=False)
        return e

    def measure(self, row: Row, batch: int, entry: dict) -> None:
        """Build, warm up, time; fills ``entry`` (also read after an out-of-memory error) and appends it."""
        a, dev = self.args, self.device
        t_run = time.perf_counter()
        before = self.allocated_gib()
        entry["allocated_before_gib"] = _round(before, 3)
        log(f"  allocated before: {before or 0:.3f} GiB")
        if self.cuda:  # (an out-of-memory error in the build then reports this run's peak)
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t0 = time.perf_counter()
        tr = build(row, self.shape, a.seq, dev, entry["compiled"])
        try:
            sync(dev)
            entry["build_s"] = round(time.perf_counter() - t0, 2)
            n_params = sum(p.numel() for p in tr.model.parameters())
            log(f"  built in {entry['build_s']:.1f}s: {n_params / 1e6:,.1f} M parameters, "
                f"{({str(p.dtype) for p in tr.model.parameters()})}, allocated {self.allocated_gib() or 0:.2f} GiB")
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.reset_accumulated_memory_stats()  # num_alloc_retries counts from here
            times_ms, loss = [], None
            for i in range(a.warmup + a.steps):
                ids = torch.randint(0, self.shape["vocab"], (batch, a.seq), device=dev)
                timed = i >= a.warmup
                if self.cuda and timed:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    loss = train_step(tr, ids)
                    e.record()
                    e.synchronize()
                    times_ms.append(s.elapsed_time(e))
                    continue
                sync(dev)
                t = time.perf_counter()
                loss = train_step(tr, ids)
                sync(dev)
                if i == 0:
                    entry["first_step_s"] = round(time.perf_counter() - t, 2)
                    log(f"  first step {entry['first_step_s']:.1f}s")
                if timed:
                    times_ms.append((time.perf_counter() - t) * 1e3)
            if self.cuda:
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
                entry["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
                entry["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            step_ms = statistics.median(times_ms)
            entry.update(ok=True, step_ms=round(step_ms, 2), tok_s=round(batch * a.seq / step_ms * 1e3, 1),
                         loss=round(float(loss), 4), wall_s=round(time.perf_counter() - t_run, 1))
            self.res["rows"].append(entry)
            log(f"  {row.name} @ {batch}: {entry['tok_s']:,.0f} tok/s, step {step_ms:.1f} ms "
                f"(min {min(times_ms):.1f}, max {max(times_ms):.1f}), peak "
                f"{entry['peak_gib'] if entry['peak_gib'] is not None else '-'} GiB (reserved {entry['reserved_gib']}, "
                f"allocator retries {entry['alloc_retries']}), loss {entry['loss']}")
            if (row.name, batch) in a.profile:
                try:
                    self.profile(tr, batch, step_ms)
                except Exception as ex:  # noqa: BLE001 - the run's figures above stand
                    self.res["errors"][f"profile {row.name}@{batch}"] = repr(ex)[:500]
                    log(f"  profile FAILED: {ex!r}")
        finally:
            tr.close()

    def profile(self, tr: Trainer, batch: int, step_ms: float) -> None:
        """One more step under ``torch.profiler``; its summary is appended to ``res['profiles']`` and printed."""
        from torch.profiler import ProfilerActivity, profile

        a, dev = self.args, self.device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        ids = torch.randint(0, self.shape["vocab"], (batch, a.seq), device=dev)
        sync(dev)
        with profile(activities=activities) as prof:
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                train_step(tr, ids)
                e.record()
                e.synchronize()
                wall_ms = s.elapsed_time(e)
            else:
                t = time.perf_counter()
                train_step(tr, ids)
                wall_ms = (time.perf_counter() - t) * 1e3
        summary = summarize_items(profile_items(prof, self.cuda), wall_ms, fp8coat_kernel_names(),
                                  "cuda" if self.cuda else "cpu")
        summary.update(row=tr.row.name, batch=batch, seq=a.seq, step_ms_unprofiled=step_ms)
        self.res["profiles"].append(summary)
        log(profile_table(summary))

    def cost_s(self, row: Row, batch: int, compiled: bool) -> float:
        """Estimated seconds of one run on the GPU (0 on the CPU: no budget there)."""
        if not self.cuda:
            return 0.0
        steps = self.args.warmup + self.args.steps
        return (BUILD_COST_S + (COMPILE_COST_S if compiled else 0.0)
                + steps * batch * self.args.seq / EST_TOK_S[row.library]
                + (PROFILE_COST_S if (row.name, batch) in self.args.profile else 0.0))

    def run_row(self, row: Row, batches: list[int]) -> None:
        """``row`` at ``batches`` in order, until one does not succeed (out of memory, error, budget)."""
        compiled = row.compiled and self.args.compile
        try:
            why = check_row(row, self.device)
        except RowUnavailable as ex:  # recorded as a failed run of the row's first batch
            self.res["errors"][row.name] = str(ex)
            self.res["rows"].append(self.entry(row, batches[0], compiled, row.cache_fp8_weights))
            log(f"[{row.name}] FAILED: {ex}")
            self.save()
            return
        if why is not None:
            self.res["skipped"].append(f"{row.name} ({why})")
            log(f"[{row.name}] skipped: {why}")
            self.save()
            return
        # the recipe's effective value where the field exists (None for the anchors and older fp8coat)
        cache = getattr(coat_recipe(row), "cache_fp8_weights", None) if row.library == "fp8coat" else None
        for batch in batches:
            if self.run_row_batch(row, batch, compiled, cache) != "ok":
                break

    def run_row_batch(self, row: Row, batch: int, compiled: bool, cache_fp8_weights: bool | None) -> str:
        """One (row, batch) run under :meth:`harness.Bench.attempt`; returns ``ok``, ``oom``, ``error`` or
        ``skipped``."""
        name = f"{row.name}@{batch}"
        entry = self.entry(row, batch, compiled, cache_fp8_weights)
        outcome = {"value": None}
        t0 = time.perf_counter()

        def fn():
            self.measure(row, batch, entry)
            outcome["value"] = "ok"

        def on_oom():
            outcome["value"] = "oom"
            entry.update(ok=False, oom=True, wall_s=round(time.perf_counter() - t0, 1),
                         peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2) if self.cuda else None)
            self.res["rows"].append(entry)

        n_skipped = len(self.res["skipped"])
        self.attempt(name, fn, cost_s=self.cost_s(row, batch, compiled), on_oom=on_oom,
                     cleanup=lambda: self.release(name))
        if outcome["value"] == "oom":
            self.res["errors"].pop(name, None)  # expected: the row's entry says oom
            self.save()
            return "oom"
        if outcome["value"] == "ok":
            return "ok"
        if len(self.res["skipped"]) > n_skipped:
            return "skipped"
        # an allocation failing inside compilation (autotuning) arrives wrapped in a compiler error; its message
        # stays under errors
        oom = "out of memory" in self.res["errors"].get(name, "").lower()
        entry.update(ok=False, oom=oom, wall_s=round(time.perf_counter() - t0, 1))
        self.res["rows"].append(entry)
        self.save()
        return "oom" if oom else "error"

    # -- bytes saved for backward -----------------------------------------------------------------------------

    def saved_bytes(self) -> None:
        """``measure_saved_tensors`` of one decoder layer's forward (bf16 parameters) per recipe."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        import fp8coat
        from fp8coat.memory import measure_saved_tensors

        a, dev, shape = self.args, self.device, self.shape
        recipes = {"bf16": "bf16", "coat": "coat"}
        try:
            recipes["coat_cache"] = coat_recipe(fp8coat_row("saved_bytes", cache_fp8_weights=True))
        except RowUnavailable as ex:
            self.res["skipped"].append(f"saved_bytes/coat_cache ({ex})")
        cfg = llama_config(shape, a.seq)
        batch = a.saved_batch
        unit = batch * a.seq * shape["hidden"] * 2
        out_res = {"batch": batch, "seq": a.seq, "hidden": shape["hidden"], "U_bytes": unit, "recipes": {}}
        for key, recipe in recipes.items():
            torch.manual_seed(0)
            with torch.device(dev), default_dtype(torch.bfloat16):
                layer = LlamaDecoderLayer(cfg, layer_idx=0)
                rope = LlamaRotaryEmbedding(cfg)
            layer.train()
            fp8coat.convert(torch.nn.ModuleList([layer]), recipe)  # convert() works below a ModuleList
            x = torch.randn(batch, a.seq, shape["hidden"], device=dev, dtype=torch.bfloat16, requires_grad=True)
            with torch.no_grad():
                pe = rope(x, torch.arange(a.seq, device=dev)[None])

            def forward(layer=layer, x=x, pe=pe):
                out = layer(x, position_embeddings=pe)
                return out[0] if isinstance(out, tuple) else out

            out, rep = measure_saved_tensors(forward, modules=layer)
            del out
            out_res["recipes"][key] = {"total_bytes": rep.total_bytes, "parameter_bytes": rep.parameter_bytes,
                                       "weight_copy_bytes": getattr(rep, "weight_copy_bytes", None),
                                       "total_U": rep.total_bytes / unit, "by_op": dict(rep.by_op),
                                       "by_module": dict(rep.by_module), "table": rep.table(unit)}
            log(f"  saved for backward, {key} (U = {unit:,} bytes):\n{rep.table(unit)}")
            del layer, rope, x, pe, rep
            self.free()
        self.res["saved_bytes"] = out_res


# ---------------------------------------------------------------------------------------------------------------
# report and command line


def best_tok_s(rows: list[dict], name: str) -> float | None:
    """The highest tok/s of ``name``'s successful runs, None when it has none."""
    found = [r["tok_s"] for r in rows if r["row"] == name and r["ok"]]
    return max(found) if found else None


def table(res: dict) -> str:
    """Markdown table of every run, with tok/s relative to the best torchao and bf16amp_compiled runs."""
    rows = res["rows"]
    t_ref, b_ref = best_tok_s(rows, TORCHAO_ROW), best_tok_s(rows, BF16_ROW)
    lines = [f"Llama-2-7B shape, seq {res['config']['seq']}; x torchao / x bf16: tok/s over the best "
             f"{TORCHAO_ROW} ({fmt(t_ref, ',.0f')}) / {BF16_ROW} ({fmt(b_ref, ',.0f')}) of this run",
             "| row | batch | status | tok/s | peak GiB | x torchao | x bf16 | step ms | first step s | build s "
             "| loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "ok" if r["ok"] else ("out of memory" if r["oom"] else "failed")
        tps = r["tok_s"]
        xt = tps / t_ref if tps and t_ref else None
        xb = tps / b_ref if tps and b_ref else None
        lines.append(f"| {r['row']} | {r['batch']} | {status} | {fmt(tps, ',.0f')} | {fmt(r['peak_gib'], '.2f')} "
                     f"| {fmt(xt, '.2f')} | {fmt(xb, '.2f')} | {fmt(r['step_ms'], '.1f')} | "
                     f"{fmt(r['first_step_s'], '.1f')} | {fmt(r['build_s'], '.1f')} | {fmt(r['loss'], '.4f')} |")
    lines += harness.problem_lines(res)
    return "\n".join(lines)


def parse_batches(specs: list[str]) -> dict[str, list[int]]:
    """``["row:b1,b2;row2:b3", ...]`` (``;`` or whitespace between rows) → {row: [batches]} (sorted)."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        for part in spec.replace(";", " ").split():
            name, sep, values = part.partition(":")
            if not sep or name not in ROWS:
                raise SystemExit(f"--batches {part!r}: expected ROW:b1,b2 with ROW one of {sorted(ROWS)}")
            out[name] = sorted({int(b) for b in values.split(",") if b})
    return out


def make_plan(args) -> list[tuple[Row, list[int]]]:
    """[(row, ascending batches)] from ``--rows``, ``--batches`` and ``--profile``, in run order."""
    names = [n for n in args.rows.split(",") if n] if args.rows else list(DEFAULT_ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows are {sorted(ROWS)}")
    given = parse_batches(args.batches)
    names += [n for n in given if n not in names]
    plan = {}
    for n in names:
        if n in given:
            plan[n] = given[n]
        elif args.dry_run:
            plan[n] = list(DRY_BATCHES.get(n, (2,)))
        else:
            plan[n] = sorted({max(1, b * REF_SEQ // args.seq) for b in DEFAULT_BATCHES[n]})
    for name, batch in args.profile:
        plan.setdefault(name, [])
        plan[name] = sorted(set(plan[name]) | {batch})
    return [(ROWS[n], b) for n, b in plan.items()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(
        ap, steps=3, steps_help="timed steps per run (median)", budget_s=540.0,
        budget_help="a run starts only while the elapsed time plus its estimated cost fits (s)",
        sections_help="(unused)",
        dry_run_help="tiny shapes on the CPU (hidden 64, 2 layers, 4 heads, MLP 176, vocab 96, seq 32), no compile")
    ap.set_defaults(warmup=2)
    ap.add_argument("--rows", default="", help=f"comma list of rows (default: {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--batches", action="append", default=[], help="ROW:b1,b2[;ROW:...], repeatable")
    ap.add_argument("--seq", type=int, default=REF_SEQ)
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                    help="run every row eagerly (the default with --dry-run)")
    ap.add_argument("--profile", action="append", default=[],
                    help="ROW@BATCH: profile one step of that run (repeatable)")
    ap.add_argument("--saved-bytes", action="store_true", help="bytes saved for backward of one decoder layer")
    ap.add_argument("--saved-batch", type=int, default=None, help="batch of --saved-bytes (default: 16; dry: 2)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.seq = DRY_SEQ
        args.compile = False if args.compile is None else args.compile
    args.compile = True if args.compile is None else args.compile
    args.warmup = max(1, args.warmup)  # the first step (compilation, allocations) is never timed
    args.saved_batch = args.saved_batch or (2 if args.dry_run else 16)
    profiles = []
    for spec in args.profile:
        name, sep, batch = spec.partition("@")
        if not sep or name not in ROWS or not batch.isdigit():
            raise SystemExit(f"--profile {spec!r}: expected ROW@BATCH with ROW one of {sorted(ROWS)}")
        profiles.append((name, int(batch)))
    args.profile = profiles
    args.plan = make_plan(args)
    return harness.finish_args(args)


def run_meta(argv) -> dict:
    """Provenance (date, commit, command) plus the GPU and package versions."""
    meta = provenance.run_meta("benchmarks.llama7b", argv)
    meta.update(provenance.package_versions())
    if provenance.gpu_name():
        meta["gpu"] = provenance.gpu_name()
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    b = Bench(args, run_meta(argv))
    shape = b.shape
    log(f"llama7b on {args.device}: {shape}, seq {args.seq}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"compile={args.compile}, budget {args.budget_s:.0f}s; plan: "
        + "; ".join(f"{r.name}:{','.join(map(str, bs))}" for r, bs in args.plan))

    def runs():
        if args.saved_bytes:
            b.attempt("saved_bytes", b.saved_bytes, optional=False)
        for row, batches in args.plan:
            b.run_row(row, batches)

    # room for every variant dynamo compiles (never a fall-back to eager), for this process's runs only
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 64}):
        b.main_loop(runs)
    b.finish("llama7b", table(b.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
