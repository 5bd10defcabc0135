"""Multi-GPU (FSDP2) benchmark: throughput per GPU against BF16 and torchao float8, loss parity of N GPUs with one,
distributed checkpoints resumed on N and on 1 GPU, and scaling from 1 to N GPUs with a profile of the sharded step.

Every measurement is its own ``torchrun`` launch (``python -m torch.distributed.run --standalone``), run with a
time limit of its own and stopped cleanly when it passes it (SIGTERM to torchrun, which stops its workers, then
SIGKILL to every process of the launch still alive): an out-of-memory error or a hang ends that measurement only.
The driver never touches a GPU itself. It collects each launch's JSON and writes ``<out>/multi_gpu.json`` after
every finished measurement (``meta``: date, commit (``FP8COAT_COMMIT``), command, GPU name and count, package
versions); each launch's output is kept in ``<out>/logs/``; a markdown table is printed at the end.

Sections (``--sections``, default all; a measurement is skipped, with a note under ``skipped``, when the time
spent plus its estimated cost would pass ``--budget-s``):

1. ``throughput``: per model and variant, per-GPU micro-batches in ascending order until one runs out of memory:
   tok/s per GPU (batch · seq / the slowest rank's median step time over ``--steps`` timed steps, CUDA events,
   after ``--warmup`` steps of which the first compiles), per-GPU peak memory (the largest
   ``torch.cuda.max_memory_allocated`` over the ranks, from after the build), the largest batch that fit, and the
   memory that ``fp8coat plan`` predicts (``planned_peak_gib``; for torchao an estimate scaled from its one-GPU
   run). Models: ``llama7b`` (Llama-2-7B: hidden 4096, 32
   layers, 32 heads, MLP 11008, vocab 32000) and ``model4`` (the same with 4 layers), seq ``--seq`` (2048), fresh
   random tokens every step. Variants, built by :mod:`benchmarks.multi_gpu_rank` (which says exactly how):
   ``bf16`` (fp32 params, bf16 autocast, fused AdamW, fp32 gradient reduction), ``torchao_fp8`` (torchao float8
   with FP8 all-gather, ``AdamWFp8`` where it steps DTensors), ``coat`` (``fp8coat train --fsdp``'s model and
   ``fp8coat.AdamW``), ``coat_fp8_gather`` (the same with ``--fp8-all-gather``); every variant compiled per decoder
   layer (``--compile``). Default batches: ``llama7b``: the largest per-GPU batch ``p`` that ``fp8coat plan``
   fits in 95% of the GPU's memory (torchao: the estimate), then ``p + 1``; where ``p`` runs out of memory,
   ``p - 1`` is tried once. ``model4``: 8 per GPU (it fits far more; ``--batches model4/coat:8,32,64`` searches).
   All first batches run before the larger ones, so that a tight budget drops the out-of-memory probes first.
2. ``parity``: ``fp8coat train`` (the real command line, ``coat``, the ``model4`` shape as an HF config JSON,
   ``--tokenizer bytes`` on the repository's own Markdown, which every checkout carries) for ``--parity-steps``
   (50) steps on N GPUs (torchrun) and in one process on one GPU with the same global batch (N ·
   ``--parity-batch``): per-step loss differences (step 1, max, mean; absolute and relative to the loss) against
   :data:`PARITY_TOLERANCE`.
3. ``dcp``: the N-GPU run of ``parity`` saves a distributed checkpoint at ``--dcp-step`` (default: 5 steps before
   the end); it is resumed on N GPUs and on 1 GPU (``--fsdp off``), and their losses after it are compared with the
   uninterrupted run's (N → N is expected to be identical; N → 1 is reported). Checkpoints are hard-linked, not
   copied, into the resumed runs' folders.
4. ``scaling``: ``coat`` on ``model4`` at ``--scaling-batch`` (8) per GPU on 1 GPU and on N (tok/s per GPU, their
   ratio), and one more step of the N-GPU run under ``torch.profiler`` on rank 0, its time split by
   :func:`benchmarks.llama7b.summarize_items` into NCCL collectives, FP8 GEMMs, BF16 GEMMs, attention, fp8coat
   Triton kernels, other, and idle (the collectives run on their own stream: categories are kernel time and may
   add up to more than the step; idle is the step's wall time minus the time at least one kernel ran).

Time on 2 H200s, an estimate (nothing of this has run on GPUs yet; the budget's cost model, from the one-GPU
runs: per launch ≈ 15 s of process start, imports and process group, the build, a variant's first compilation
10-25 s and 5 s once inductor's caches are warm, and the steps at the one-GPU tok/s): ``throughput`` ≈ 450 s
(``llama7b``: 4 variants × 2 launches ≈ 355 s; ``model4``: 4 launches ≈ 95 s), inside the default ``--budget-s
540``: one 600-second call; ``parity`` ≈ 90 s, ``dcp`` ≈ 60 s, ``scaling`` ≈ 80 s: the three in a second call
(≈ 230 s). Where the estimate is short, the budget drops the out-of-memory probes (the second batches) first. The run
folders (checkpoints: about 6.5 GB each for ``model4``) go to ``--work-dir`` (default
``/tmp/fp8coat_multi_gpu``), outside ``--out``; only their ``metrics.jsonl`` is copied into ``<out>/runs/``.

Usage, from the repository root (through ``scripts/gpu_check.sh``, section ``multi_gpu``, which installs the
carried torchao wheel first: ``GPU_SECTIONS="env multi_gpu" MULTI_GPU_ARGS="--sections throughput" bash
scripts/gpu_check.sh``)::

    python -m benchmarks.multi_gpu --gpus 2 --out $OUT/call1 --sections throughput          # call 1
    python -m benchmarks.multi_gpu --gpus 2 --out $OUT/call2 --sections parity,dcp,scaling  # call 2
    python -m benchmarks.multi_gpu --dry-run --out /tmp/multi_gpu                           # CPU, gloo, 2 ranks

``--dry-run``: tiny shapes (hidden 64, 2 layers, 4 heads, MLP 176, vocab 96, seq 32) on the CPU with gloo and 2
ranks, eager, few steps; torchao skipped (it needs CUDA); ``coat`` at batches 2 and 4 with a simulated
out-of-memory error above 2 (``--fake-oom-above``), so that every path (launch, out-of-memory, JSON, table) runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from benchmarks import harness, llama7b, provenance
from benchmarks.harness import fmt, log
from benchmarks.multi_gpu_rank import VARIANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("throughput", "parity", "dcp", "scaling")
MODEL_NAMES = ("llama7b", "model4")
LLAMA2_7B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
             "vocab_size": 32000}
MODELS = {"llama7b": {**LLAMA2_7B, "num_hidden_layers": 32}, "model4": {**LLAMA2_7B, "num_hidden_layers": 4}}
DRY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 176, "vocab_size": 96}
DRY_SEQ = 32
DRY_BATCHES = {"coat": [2, 4]}  # every other variant: [2]
MODEL4_BATCH = 8
USABLE_MEMORY = 0.95  # the share of a GPU's memory fp8coat train and fp8coat plan count as usable
# torchao float8 compiled + AdamWFp8, Llama-2-7B at seq 2048 on one H200 (docs/results/llama7b/
# 2026-12-05-h200-seq2048.json): batch 8 peaked at 94.21 GiB, batch 10 at 108.26 GiB, so 7.03 GiB per sequence on
# top of 37.9 GiB: the fp32 parameters and AdamWFp8's states (4 + 2.03 bytes per parameter; the peak comes early
# in backward, before the fp32 gradients, 4 more bytes per parameter, exist)
TORCHAO_RESIDENT_BYTES = 6.03  # per parameter
TORCHAO_GRAD_BYTES = 4.0
TORCHAO_GIB_PER_SEQ = 7.03  # Llama-2-7B (32 layers), seq 2048
GIB = 2**30
# the repository's own text: real English that every checkout carries (a machine without network has no corpus)
DEFAULT_DATA = ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "docs")
# N GPUs against one process with the same global batch, |loss difference| / loss: each rank quantizes its rows
# with its own per-tensor scales and the gradients are summed in another order, so the losses drift apart step by
# step (tests/test_train_fsdp.py measured on its tiny model at lr 3e-3: 1.6e-3 at step 1 (3e-4 of the loss),
# 8e-3 by step 8 (1.6e-3)); a judgment, with room for 50 steps, not a measured bound
PARITY_TOLERANCE = {"step1_rel": 1e-3, "max_rel": 2e-2, "mean_rel": 5e-3}

# cost estimates on a GPU for the budget (seconds; tokens per second per GPU, from the one-GPU runs)
LAUNCH_S = 15.0  # process start, imports, CUDA and NCCL set-up, teardown
BUILD_S = {"llama7b": 8.0, "model4": 3.0}
# a variant's first compilation in this driver; later launches find inductor's caches on disk (the one-GPU 7B
# benchmark's first steps: coat 18 s, torchao 23 s, then 3-11 s)
COMPILE_S = {"bf16": 10.0, "torchao_fp8": 25.0, "coat": 15.0, "coat_fp8_gather": 15.0}
COMPILE_CACHED_S = 5.0
PROFILE_S = 20.0
SAVE_S = 12.0  # one checkpoint of model4 (DCP shards + the HF export)
EST_TOK_S = {"llama7b": {"bf16": 11_000, "torchao_fp8": 16_000, "coat": 19_000, "coat_fp8_gather": 19_000},
             "model4": {"bf16": 75_000, "torchao_fp8": 95_000, "coat": 100_000, "coat_fp8_gather": 100_000}}
EST_TRAIN_TOK_S = 80_000  # fp8coat train, eager, model4, per GPU
DRY_TIMEOUT_S = 300.0
MIN_TIMEOUT_S = 180.0

ROW_KEYS = ("model", "variant", "gpus", "batch", "seq", "compiled", "status", "tok_s_per_gpu", "step_ms",
            "step_ms_min", "step_ms_max", "peak_gib", "build_peak_gib", "reserved_gib", "alloc_retries",
            "planned_peak_gib", "first_step_s", "build_s", "loss", "optimizer", "chunked_loss", "notes", "params",
            "rc", "wall_s", "log")
RESULT_KEYS = ("tok_s_per_gpu", "step_ms", "step_ms_min", "step_ms_max", "peak_gib", "build_peak_gib",
               "reserved_gib", "alloc_retries", "first_step_s", "build_s", "loss", "optimizer", "chunked_loss",
               "notes", "params")


# ---------------------------------------------------------------------------------------------------------------
# launching and stopping a measurement


def child_env() -> dict:
    """This process's environment with the repository first on PYTHONPATH (and unbuffered output for the logs)."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def descendants(pid: int) -> set[int]:
    """The processes descended from ``pid`` (children, their children, ...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a launch: SIGTERM to the launcher's process group (torchrun then stops its workers), and after
    ``grace_s`` SIGKILL to that group and to every process that descended from the launcher (torchrun starts its
    workers in sessions of their own, outside its group)."""
    family = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    family |= descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _kill(family, signal.SIGKILL)
    proc.wait()


def launch(cmd: list[str], log_path: str, timeout_s: float) -> dict:
    """Run ``cmd`` (from the repository root, output to ``log_path``) for at most ``timeout_s`` seconds; also
    stopped when this process is (SIGTERM, Ctrl-C). Returns ``{"rc", "timed_out", "wall_s"}``."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    timed_out = False
    with open(log_path, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                stop(proc)
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": round(time.time() - t0, 1)}


def log_tail(path: str, chars: int = 600) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------------
# models and planned memory


def model_config(name: str, dry_run: bool) -> dict:
    """The HF config (a dict) of model ``name`` (every model is the tiny one in a dry run)."""
    shape = DRY_MODEL if dry_run else MODELS[name]
    return {"model_type": "llama", **shape, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def torchao_estimate_gib(config: dict, batch: int, gpus: int, seq: int) -> float:
    """torchao float8's per-GPU peak, from its one-GPU 7B runs (``fp8coat plan`` has no model of it): parameters and
    optimizer states sharded over ``gpus`` plus the activations per sequence of those runs (scaled by the number
    of layers and the sequence length), or, where larger, the state after backward (with the gradients)."""
    from fp8coat.memory import ModelShape

    params = sum(p.numel for p in ModelShape.from_config(config).parameters()) / gpus
    per_seq = TORCHAO_GIB_PER_SEQ * config["num_hidden_layers"] / 32 * seq / 2048
    return max(TORCHAO_RESIDENT_BYTES * params / GIB + per_seq * batch,
               (TORCHAO_RESIDENT_BYTES + TORCHAO_GRAD_BYTES) * params / GIB)


def planned_peak_gib(config: dict, variant: str, batch: int, gpus: int, seq: int, compiled: bool) -> float:
    """The per-GPU peak of ``variant`` at ``batch`` sequences per GPU as ``fp8coat plan`` predicts it (FP8
    all-gather planned as BF16 gathering, whose gathered weights take more); torchao float8:
    :func:`torchao_estimate_gib`."""
    from fp8coat.memory import ModelShape, PlanSettings, plan_memory

    if variant == "torchao_fp8":
        return torchao_estimate_gib(config, batch, gpus, seq)
    common = {"batch": batch * gpus, "seq": seq, "gpus": gpus, "compiled": compiled}
    if variant == "bf16":
        settings = PlanSettings(recipe="bf16", optimizer="torch", chunked_loss=False, **common)
    else:
        settings = PlanSettings(recipe="coat", **common)
    return plan_memory(ModelShape.from_config(config), settings).peak / GIB


def planned_max_batch(config: dict, variant: str, gpus: int, seq: int, compiled: bool, gib: float) -> int:
    """The largest per-GPU batch whose planned peak fits in ``gib`` (0 if batch 1 does not)."""
    batch = 0
    while batch < 4096 and planned_peak_gib(config, variant, batch + 1, gpus, seq, compiled) <= gib:
        batch += 1
    return batch


def parse_batches(specs: list[str], models, variants) -> dict[tuple[str, str], list[int]]:
    """``["MODEL/VARIANT:b1,b2;MODEL/VARIANT:b3", ...]`` → {(model, variant): sorted batches}."""
    out = {}
    for spec in specs:
        for part in spec.replace(";", " ").split():
            key, sep, values = part.partition(":")
            model, slash, variant = key.partition("/")
            if not (sep and slash) or model not in models or variant not in variants:
                raise SystemExit(f"--batches {part!r}: expected MODEL/VARIANT:b1,b2 with MODEL one of "
                                 f"{', '.join(models)} and VARIANT one of {', '.join(variants)}")
            out[(model, variant)] = sorted({int(b) for b in values.split(",") if b})
    return out


# ---------------------------------------------------------------------------------------------------------------
# loss logs of fp8coat train runs


def read_losses(out_dir: str) -> tuple[dict[int, float], float | None]:
    """``({step: training loss}, last validation loss)`` from a run's ``metrics.jsonl`` (empty where missing)."""
    from fp8coat.train.progress import MetricsLog

    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        records = MetricsLog.read(path) if os.path.exists(path) else []
    except ValueError as ex:  # a damaged line (a run killed while writing it): reported by the run's status
        log(f"  {ex}")
        records = []
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return {r["step"]: r["loss"] for r in records}, (vals[-1] if vals else None)


def compare_losses(losses: dict[int, float], reference: dict[int, float], after_step: int = 0) -> dict:
    """Per-step loss differences from ``reference`` over the steps after ``after_step`` that both logged."""
    steps = sorted(s for s in losses if s in reference and s > after_step)
    if not steps:
        return {"steps": [], "finite": False}
    diffs = [abs(losses[s] - reference[s]) for s in steps]
    rel = [d / abs(reference[s]) if reference[s] else math.inf for d, s in zip(diffs, steps)]
    return {"steps": steps, "first_abs_diff": diffs[0], "max_abs_diff": max(diffs),
            "mean_abs_diff": statistics.fmean(diffs), "first_rel_diff": rel[0], "max_rel_diff": max(rel),
            "mean_rel_diff": statistics.fmean(rel), "exact": all(d == 0 for d in diffs),
            "finite": all(math.isfinite(d) for d in diffs)}


def within_tolerance(diff: dict) -> bool:
    """Whether N GPUs' losses agree with one GPU's within :data:`PARITY_TOLERANCE`."""
    return bool(diff["steps"] and diff["finite"] and diff["first_rel_diff"] <= PARITY_TOLERANCE["step1_rel"]
                and diff["max_rel_diff"] <= PARITY_TOLERANCE["max_rel"]
                and diff["mean_rel_diff"] <= PARITY_TOLERANCE["mean_rel"])


def clone_run(src: str, dst: str, step: int) -> None:
    """A copy of the run folder ``src`` in ``dst`` holding its checkpoints up to ``step`` only: the run's own files
    copied (a resume rewrites ``metrics.jsonl`` in place), the checkpoints' files hard-linked (a resume only reads
    them and writes new checkpoints into new folders), or copied where a link is not possible."""
    def ignore(folder, names):
        if folder == src:  # the finished run's summary would make a failed resume look finished
            return [n for n in names if n == "summary.json"]
        if os.path.basename(folder) != "checkpoints":
            return []
        return [n for n in names if n.startswith("step_") and n[5:].isdigit() and int(n[5:]) > step]

    def link_or_copy(s, d):
        if f"{os.sep}checkpoints{os.sep}" in s:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=ignore, copy_function=link_or_copy)


# ---------------------------------------------------------------------------------------------------------------
# the benchmark


class Bench(harness.Bench):
    """The sections of one driver process; every launch runs under :meth:`harness.Bench.attempt`."""

    json_name = "multi_gpu.json"

    def __init__(self, args, meta: dict):
        config = {k: v for k, v in vars(args).items() if k != "batches"}
        config["batches"] = {f"{m}/{v}": b for (m, v), b in args.batches.items()}
        config["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")  # the caching allocator's settings
        super().__init__(args, {"config": config, "throughput": [], "parity": None, "dcp": None, "scaling": None,
                                "runs": {}, "errors": {}, "skipped": []}, meta)
        self.configs: dict[str, str] = {}
        self.compiled_once: set[str] = set()  # variants compiled by an earlier launch (inductor's caches are warm)

    # -- helpers ----------------------------------------------------------------------------------------------

    def config_path(self, model: str) -> str:
        """An HF config JSON of ``model`` in the work folder (``fp8coat train --model`` and the ranks read it)."""
        if model not in self.configs:
            path = os.path.join(self.args.work_dir, "models", f"{model}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(model_config(model, self.args.dry_run), f, indent=1)
            self.configs[model] = path
        return self.configs[model]

    def timeout_s(self, cost_s: float) -> float:
        """A launch's time limit: 3× its estimated cost (at least ``MIN_TIMEOUT_S``), but no further than 30 s
        past the budget (``DRY_TIMEOUT_S`` on the CPU)."""
        if not self.cuda:
            return DRY_TIMEOUT_S
        left = self.args.budget_s - (time.time() - self.t_start)
        return max(30.0, min(max(MIN_TIMEOUT_S, 3 * cost_s), left + 30.0))

    def log_path(self, name: str) -> str:
        return os.path.join(self.args.out, "logs", name.replace("/", "_").replace("@", "_") + ".log")

    def unavailable(self, variant: str) -> str | None:
        """Why ``variant`` cannot run here (a note), or None."""
        if variant == "torchao_fp8":
            if not self.cuda:
                return "torchao float8 needs a CUDA GPU"
            if importlib.util.find_spec("torchao") is None:
                return "torchao is not installed"
        return None

    # -- throughput measurements (benchmarks.multi_gpu_rank) ---------------------------------------------------

    def batches(self, model: str, variant: str) -> tuple[list[int], bool]:
        """The per-GPU batches of ``(model, variant)`` in ascending order, and whether they come from the plan."""
        a = self.args
        if (model, variant) in a.batches:
            return a.batches[(model, variant)], False
        if a.dry_run:
            return DRY_BATCHES.get(variant, [2]), False
        if model == "model4":
            return [MODEL4_BATCH], False
        p = planned_max_batch(model_config(model, False), variant, a.gpus, a.seq, variant in a.compile,
                              USABLE_MEMORY * a.gpu_memory_gib)
        return [max(p, 1), max(p, 1) + 1], True

    def cost_s(self, model: str, variant: str, batch: int, profile: bool = False) -> float:
        """Estimated seconds of one throughput launch on GPUs (0 on the CPU: no budget there)."""
        if not self.cuda:
            return 0.0
        a = self.args
        compile_s = 0.0
        if variant in a.compile:
            compile_s = COMPILE_CACHED_S if variant in self.compiled_once else COMPILE_S[variant]
        steps_s = (a.warmup + a.steps + profile) * batch * a.seq / EST_TOK_S[model][variant]
        return LAUNCH_S + BUILD_S[model] + compile_s + steps_s + (PROFILE_S if profile else 0.0)

    def measure(self, rows: list, model: str, variant: str, batch: int, gpus: int, profile: bool = False) -> dict:
        """One launch of :mod:`benchmarks.multi_gpu_rank`: its row (status ``ok``, ``oom``, ``error``,
        ``timeout``; ``skipped`` for the budget), appended to ``rows`` when it ran."""
        a = self.args
        name = f"{model}/{variant}@{batch}x{gpus}"
        row = dict.fromkeys(ROW_KEYS)
        row.update(model=model, variant=variant, gpus=gpus, batch=batch, seq=a.seq, compiled=variant in a.compile,
                   status="skipped")
        if self.cuda:
            row["planned_peak_gib"] = round(planned_peak_gib(model_config(model, False), variant, batch, gpus, a.seq,
                                                             row["compiled"]), 2)
        cost = self.cost_s(model, variant, batch, profile)
        self.attempt(name, lambda: self.run_rank_launch(name, row, profile, rows, cost), cost_s=cost)
        return row

    def run_rank_launch(self, name: str, row: dict, profile: bool, rows: list, cost: float) -> None:
        a = self.args
        folder = os.path.join(a.work_dir, "measure", name.replace("/", "_").replace("@", "_"))
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        model = row["model"]
        spec = {"model_config": self.config_path(model), "vocab": model_config(model, a.dry_run)["vocab_size"],
                "variant": row["variant"], "batch": row["batch"], "seq": a.seq, "warmup": a.warmup,
                "steps": a.steps, "compile": row["compiled"], "device": a.device, "profile": profile,
                "result": os.path.join(folder, "result.json"),
                "fake_oom": a.fake_oom_above is not None and row["batch"] > a.fake_oom_above}
        spec_path = os.path.join(folder, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        rows.append(row)
        row["status"] = "error"  # until the launch says otherwise
        if row["compiled"]:
            self.compiled_once.add(row["variant"])
        run = launch(torchrun_cmd(row["gpus"], ["-m", "benchmarks.multi_gpu_rank", spec_path]), self.log_path(name),
                     self.timeout_s(cost))
        row.update(rc=run["rc"], wall_s=run["wall_s"], log=os.path.relpath(self.log_path(name), a.out))
        markers = sorted(os.listdir(folder))
        if os.path.exists(spec["result"]):
            with open(spec["result"]) as f:
                result = json.load(f)
            row.update({k: result.get(k) for k in RESULT_KEYS}, status="ok")
            if result.get("profile") is not None:
                row["profile"] = result["profile"]
        elif any(m.startswith("oom_rank") for m in markers):
            row["status"] = "oom"
        else:
            row["status"] = "timeout" if run["timed_out"] else "error"
            errors = [m for m in markers if m.startswith("error_rank")]
            detail = log_tail(os.path.join(folder, errors[0])) if errors else log_tail(self.log_path(name))
            self.res["errors"][name] = f"{row['status']} (rc {run['rc']}): {detail}"
        log(f"  {name}: {row['status']}" + (f", {row['tok_s_per_gpu']:,.0f} tok/s per GPU, peak "
                                          f"{row['peak_gib']} GiB" if row["status"] == "ok" else ""))

    def throughput(self) -> None:
        """Every (model, variant) at its first batch, then each one's larger batches until one does not fit (or,
        for planned batches whose first ran out of memory, the next smaller one)."""
        a, rows = self.args, self.res["throughput"]
        plan = []
        for model in a.models:
            for variant in a.variants:
                why = self.unavailable(variant)
                if why is not None:
                    self.res["skipped"].append(f"{model}/{variant} ({why})")
                    log(f"[{model}/{variant}] skipped: {why}")
                    continue
                batches, planned = self.batches(model, variant)
                plan.append((model, variant, batches, planned))
        first = {(m, v): self.measure(rows, m, v, bs[0], a.gpus)["status"] for m, v, bs, _ in plan}
        for model, variant, batches, planned in plan:
            status = first[(model, variant)]
            if status == "ok":
                for batch in batches[1:]:
                    if self.measure(rows, model, variant, batch, a.gpus)["status"] != "ok":
                        break
            elif status == "oom" and planned and batches[0] > 1:
                self.measure(rows, model, variant, batches[0] - 1, a.gpus)

    # -- fp8coat train runs: parity and dcp --------------------------------------------------------------------

    def train_cost_s(self, gpus: int, steps: int, saves: int) -> float:
        if not self.cuda:
            return 0.0
        tokens = self.args.parity_batch * self.args.gpus * self.args.seq * steps / gpus
        return LAUNCH_S + BUILD_S["model4"] + tokens / EST_TRAIN_TOK_S + saves * SAVE_S

    def train_run(self, name: str, gpus: int, train_args: list[str], cost: float) -> dict:
        """``fp8coat train`` on ``gpus`` GPUs (torchrun), or in one process (``gpus`` 0), unless the budget is
        spent; its record (status, losses, ...) is kept under ``runs`` and returned."""
        out_dir = train_args[train_args.index("--out-dir") + 1]
        record = {"status": "skipped", "gpus": gpus or 1, "sharded": bool(gpus), "out_dir": out_dir, "losses": {},
                  "val_loss": None}
        self.res["runs"][name] = record
        self.attempt(f"train {name}", lambda: self.train_launch(name, gpus, train_args, record, cost), cost_s=cost)
        return record

    def train_launch(self, name: str, gpus: int, train_args: list[str], record: dict, cost: float) -> None:
        a, out_dir = self.args, record["out_dir"]
        cmd = (torchrun_cmd(gpus, ["-m", "fp8coat", "train", *train_args]) if gpus
               else [sys.executable, "-m", "fp8coat", "train", *train_args])
        record["status"] = "error"
        run = launch(cmd, self.log_path(f"train_{name}"), self.timeout_s(cost))
        losses, val_loss = read_losses(out_dir)
        finished = os.path.exists(os.path.join(out_dir, "summary.json"))
        record.update(status="ok" if finished else ("timeout" if run["timed_out"] else "error"), losses=losses,
                      val_loss=val_loss, log=os.path.relpath(self.log_path(f"train_{name}"), a.out), **run)
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
            os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
            shutil.copy(os.path.join(out_dir, "metrics.jsonl"), os.path.join(a.out, "runs", f"{name}.metrics.jsonl"))
        if not finished:
            self.res["errors"][f"train {name}"] = f"{record['status']} (rc {run['rc']}): " + log_tail(
                self.log_path(f"train_{name}"))
        log(f"  train {name}: {record['status']}, {len(losses)} steps logged, {run['wall_s']} s")

    def new_run_args(self, out_dir: str, global_batch: int, save_every: int) -> list[str]:
        a = self.args
        return ["--model", self.config_path("model4"), "--recipe", "coat", "--data", a.data, "--tokenizer", "bytes",
                "--batch-size", str(global_batch), "--seq-len", str(a.seq), "--steps", str(a.parity_steps),
                "--lr", str(a.parity_lr), "--warmup-steps", str(max(1, min(10, a.parity_steps // 5))),
                "--log-every", "1", "--eval-every", "0", "--eval-batches", "2", "--save-every", str(save_every),
                "--seed", "0", "--out-dir", out_dir, "--overwrite"]

    def reference_run(self) -> dict:
        """The N-GPU run that ``parity`` compares and ``dcp`` resumes (run once; checkpoint at ``--dcp-step``)."""
        a = self.args
        if "sharded" not in self.res["runs"]:
            args = self.new_run_args(os.path.join(a.work_dir, "runs", "sharded"), a.parity_batch * a.gpus,
                                     a.dcp_step)
            self.train_run("sharded", a.gpus, args, self.train_cost_s(a.gpus, a.parity_steps, 2))
        return self.res["runs"]["sharded"]

    def parity(self) -> None:
        a = self.args
        global_batch = a.parity_batch * a.gpus
        sharded = self.reference_run()
        args = self.new_run_args(os.path.join(a.work_dir, "runs", "single"), global_batch, 0) + ["--fsdp", "off"]
        single = self.train_run("single", 0, args, self.train_cost_s(1, a.parity_steps, 1))
        diff = compare_losses(sharded["losses"], single["losses"])
        self.res["parity"] = {
            "gpus": a.gpus, "global_batch": global_batch, "seq": a.seq, "steps": a.parity_steps, "lr": a.parity_lr,
            "model": "model4", "recipe": "coat", "data": a.data, "tokenizer": "bytes", "tolerance": PARITY_TOLERANCE,
            **{k: diff.get(k) for k in ("first_abs_diff", "max_abs_diff", "mean_abs_diff", "first_rel_diff",
                                        "max_rel_diff", "mean_rel_diff")},
            "steps_compared": len(diff["steps"]), "finite": diff["finite"], "within_tolerance": within_tolerance(diff),
            "val_loss": {"sharded": sharded["val_loss"], "single": single["val_loss"]}}

    def dcp(self) -> None:
        a = self.args
        ref = self.reference_run()
        if ref["status"] != "ok":
            raise RuntimeError(f"the {a.gpus}-GPU run to resume did not finish ({ref['status']})")
        out = {"gpus": a.gpus, "save_step": a.dcp_step, "steps": a.parity_steps, "resumed": {}}
        for label, gpus, extra in ((f"resume_{a.gpus}gpu", a.gpus, []), ("resume_1gpu", 0, ["--fsdp", "off"])):
            folder = os.path.join(a.work_dir, "runs", label)
            clone_run(ref["out_dir"], folder, a.dcp_step)
            cost = self.train_cost_s(gpus or 1, a.parity_steps - a.dcp_step, 1)
            run = self.train_run(label, gpus, ["--out-dir", folder, "--resume", *extra], cost)
            diff = compare_losses(run["losses"], ref["losses"], after_step=a.dcp_step)
            out["resumed"][label] = {"gpus": gpus or 1, "status": run["status"], **diff,
                                     "val_loss_diff": (abs(run["val_loss"] - ref["val_loss"]) if run["val_loss"]
                                                       is not None and ref["val_loss"] is not None else None)}
        self.res["dcp"] = out

    # -- scaling ----------------------------------------------------------------------------------------------

    def scaling(self) -> None:
        a = self.args
        rows: list[dict] = []
        self.res["scaling"] = {"model": "model4", "variant": "coat", "batch": a.scaling_batch, "rows": rows}
        one = self.measure(rows, "model4", "coat", a.scaling_batch, 1)
        many = self.measure(rows, "model4", "coat", a.scaling_batch, a.gpus, profile=True)
        if one["status"] == "ok" and many["status"] == "ok":
            self.res["scaling"]["efficiency"] = round(many["tok_s_per_gpu"] / one["tok_s_per_gpu"], 3)
        self.res["scaling"]["profile"] = many.pop("profile", None)
        self.save()

    def run_sections(self) -> None:
        a = self.args
        for section in a.sections:
            if section != "throughput" and a.gpus < 2:
                self.res["skipped"].append(f"{section} (needs --gpus 2 or more)")
                continue
            log(f"=== {section} ===")
            self.attempt(section, getattr(self, section), optional=False)


# ---------------------------------------------------------------------------------------------------------------
# report


def best_rows(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (model, variant) with a successful run: the row of its largest batch that fit."""
    best = {}
    for r in rows:
        key = (r["model"], r["variant"])
        if r["status"] == "ok" and (key not in best or r["batch"] > best[key]["batch"]):
            best[key] = r
    return best


def throughput_table(rows: list[dict]) -> list[str]:
    best = best_rows(rows)
    lines = ["throughput per GPU (x bf16: tok/s over bf16's at its largest batch, same model); peak: the largest "
             "max_memory_allocated over the ranks",
             "| model | variant | GPUs | batch per GPU | status | tok/s per GPU | x bf16 | peak GiB | planned GiB "
             "| first step s | optimizer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = best.get((r["model"], "bf16"))
        x = r["tok_s_per_gpu"] / ref["tok_s_per_gpu"] if r["tok_s_per_gpu"] and ref else None
        lines.append(f"| {r['model']} | {r['variant']} | {r['gpus']} | {r['batch']} | {r['status']} | "
                     f"{fmt(r['tok_s_per_gpu'], ',.0f')} | {fmt(x, '.2f')} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r['planned_peak_gib'], '.2f')} | {fmt(r['first_step_s'], '.1f')} | "
                     f"{(r['optimizer'] or '-')[:60]} |")
    lines += ["", "| model | variant | largest batch that fit (smallest out of memory) | tok/s per GPU there |",
              "|---|---|---|---|"]
    for (model, variant), r in best.items():
        ooms = [x["batch"] for x in rows if (x["model"], x["variant"]) == (model, variant) and x["status"] == "oom"]
        oom = f" ({min(ooms)} OOM)" if ooms else ""
        lines.append(f"| {model} | {variant} | {r['batch']}{oom} | {r['tok_s_per_gpu']:,.0f} |")
    return lines


def parity_lines(p: dict) -> list[str]:
    verdict = "within" if p["within_tolerance"] else "OUTSIDE"
    return [f"parity: {p['gpus']} GPUs vs 1 GPU, global batch {p['global_batch']} x {p['seq']}, {p['steps']} steps "
            f"({p['steps_compared']} compared): |loss difference| at step 1 {fmt(p['first_abs_diff'], '.2e')} "
            f"({fmt(p['first_rel_diff'], '.1e')} of the loss), max {fmt(p['max_abs_diff'], '.2e')} "
            f"({fmt(p['max_rel_diff'], '.1e')}), mean {fmt(p['mean_abs_diff'], '.2e')} "
            f"({fmt(p['mean_rel_diff'], '.1e')}): {verdict} the tolerance {p['tolerance']}; validation loss "
            f"{p['val_loss']}"]


def dcp_lines(d: dict) -> list[str]:
    lines = [f"dcp: checkpoint of {d['gpus']} GPUs at step {d['save_step']}, resumed, losses of the steps after it "
             "against the uninterrupted run", "| resumed on | status | steps | max abs diff | exact | val loss diff |",
             "|---|---|---|---|---|---|"]
    for label, r in d["resumed"].items():
        lines.append(f"| {label} | {r['status']} | {len(r['steps'])} | {fmt(r.get('max_abs_diff'), '.2e')} | "
                     f"{r.get('exact', '-')} | {fmt(r['val_loss_diff'], '.2e')} |")
    return lines


def scaling_lines(s: dict) -> list[str]:
    lines = [f"scaling: {s['variant']} on {s['model']}, batch {s['batch']} per GPU; efficiency (tok/s per GPU at N "
             f"over 1 GPU): {fmt(s.get('efficiency'), '.3f')}", "| GPUs | status | tok/s per GPU | peak GiB |",
             "|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['gpus']} | {r['status']} | {fmt(r['tok_s_per_gpu'], ',.0f')} | "
                     f"{fmt(r['peak_gib'], '.2f')} |")
    if s.get("profile"):
        lines += ["", llama7b.profile_table(s["profile"])]
    return lines


def table(res: dict) -> str:
    lines = []
    if res["throughput"]:
        lines += throughput_table(res["throughput"]) + [""]
    if res["parity"]:
        lines += parity_lines(res["parity"]) + [""]
    if res["dcp"]:
        lines += dcp_lines(res["dcp"]) + [""]
    if res["scaling"]:
        lines += scaling_lines(res["scaling"])
    lines += harness.problem_lines(res)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# command line


def gpu_info() -> dict:
    """``{"count", "name", "memory_gib"}`` of the visible GPUs, read by a short child process (this process never
    initializes CUDA: it would hold memory on GPU 0 while the ranks run)."""
    code = ("import json, torch; n = torch.cuda.device_count(); print(json.dumps({'count': n, 'name': "
            "torch.cuda.get_device_name(0) if n else None, 'memory_gib': "
            "torch.cuda.get_device_properties(0).total_memory / 2**30 if n else None}))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"count": 0, "name": None, "memory_gib": None}


def _names(text: str, allowed, option: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; expected names of {', '.join(allowed)}")
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(
        ap, steps=3, steps_help="timed steps per throughput launch (median)", budget_s=540.0,
        budget_help="a launch starts only while the elapsed time plus its estimated cost fits (s)",
        sections_help=f"comma list of {', '.join(SECTIONS)} (default: all)",
        dry_run_help="tiny shapes, CPU, gloo, 2 ranks, few steps (< 3 min on 2 cores)")
    ap.set_defaults(warmup=2, sections=",".join(SECTIONS))
    ap.add_argument("--gpus", type=int, default=None, help="GPUs per launch (default: all visible; dry run: 2)")
    ap.add_argument("--models", default=None, help="throughput models (default: llama7b,model4; dry run: model4)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", action="append", default=[], help="MODEL/VARIANT:b1,b2[;...] per-GPU batches")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compile", default=None, help="variants compiled per decoder layer: all, none or a comma list "
                    "(default: all; dry run: none)")
    ap.add_argument("--scaling-batch", type=int, default=None, help=f"per-GPU batch of scaling (default "
                    f"{MODEL4_BATCH}; dry run: 2)")
    ap.add_argument("--parity-steps", type=int, default=None, help="steps of the parity runs (default 50; dry: 10)")
    ap.add_argument("--parity-batch", type=int, default=None, help="per-GPU batch of parity (default 4; dry: 2)")
    ap.add_argument("--parity-lr", type=float, default=3e-4)
    ap.add_argument("--dcp-step", type=int, default=None, help="step of the checkpoint dcp resumes (default: 5 "
                    "before the end; dry: 4 before)")
    ap.add_argument("--data", default=",".join(os.path.join(REPO, p) for p in DEFAULT_DATA),
                    help="fp8coat train --data of parity and dcp (default: the repository's Markdown)")
    ap.add_argument("--work-dir", default=os.path.join("/tmp", "fp8coat_multi_gpu"),
                    help="run folders and launch specs (checkpoints: keep outside --out)")
    ap.add_argument("--fake-oom-above", type=int, default=None, help="testing: a launch at a larger batch raises "
                    "a simulated out-of-memory error on its last rank (dry run: 2)")
    args = ap.parse_args(argv)
    info = gpu_info()
    dry = args.dry_run
    args.device = args.device or ("cpu" if dry or not info["count"] else "cuda")
    args.gpus = args.gpus or (2 if dry or not info["count"] else info["count"])
    args.gpu_name, args.gpu_memory_gib, args.gpus_visible = info["name"], info["memory_gib"], info["count"]
    args.models = _names(args.models or ("model4" if dry else ",".join(MODEL_NAMES)), MODEL_NAMES, "--models")
    args.variants = _names(args.variants, VARIANTS, "--variants")
    compile_ = args.compile or ("none" if dry else "all")
    named = {"all": list(VARIANTS), "none": []}
    args.compile = named[compile_] if compile_ in named else _names(compile_, VARIANTS, "--compile")
    if dry:
        args.seq = DRY_SEQ
        args.fake_oom_above = 2 if args.fake_oom_above is None else args.fake_oom_above
    args.scaling_batch = args.scaling_batch or (2 if dry else MODEL4_BATCH)
    args.parity_steps = args.parity_steps or (10 if dry else 50)
    args.parity_batch = args.parity_batch or (2 if dry else 4)
    args.dcp_step = args.dcp_step or args.parity_steps - (4 if dry else 5)
    if not 0 < args.dcp_step < args.parity_steps:
        raise SystemExit(f"--dcp-step {args.dcp_step}: expected a step between 1 and {args.parity_steps - 1}")
    if args.device == "cuda" and args.gpus > info["count"]:
        raise SystemExit(f"--gpus {args.gpus}: {info['count']} GPU(s) visible")
    args.batches = parse_batches(args.batches, MODEL_NAMES, VARIANTS)
    args = harness.finish_args(args)
    args.sections = _names(",".join(args.sections), SECTIONS, "--sections")
    os.makedirs(args.work_dir, exist_ok=True)
    return args


def run_meta(argv, args) -> dict:
    meta = provenance.run_meta("benchmarks.multi_gpu", argv)
    meta.update(provenance.package_versions(), gpu=args.gpu_name, gpus=args.gpus, gpus_visible=args.gpus_visible,
                gpu_memory_gib=None if args.gpu_memory_gib is None else round(args.gpu_memory_gib, 2),
                device=args.device)
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    b = Bench(args, run_meta(argv, args))
    log(f"multi_gpu on {args.gpus} x {args.gpu_name or args.device}: sections {','.join(args.sections)}, models "
        f"{','.join(args.models)}, variants {','.join(args.variants)}, seq {args.seq}, compiled "
        f"{','.join(args.compile) or 'none'}, budget {args.budget_s:.0f}s; work dir {args.work_dir}")
    b.main_loop(b.run_sections)
    b.finish("multi_gpu", table(b.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
