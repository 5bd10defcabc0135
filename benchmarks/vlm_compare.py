"""BF16 against coat on vision-language models: accuracy over several seeds, speed and memory.

For each model in ``--models`` (default: ``llava-100m`` and ``qwen2vl-100m`` on the bundled synthetic scenes):

1. **speed**: one ``fp8coat compare`` of ``--variants`` for the first seed, ``--speed-steps`` steps, alone on the
   GPU: tok/s (median of the logged intervals after the first), peak memory, and the bytes saved for backward by
   the vision tower and by the LM, per variant (``--speed-steps 0`` skips it).
2. **accuracy**: one ``fp8coat compare`` per seed of ``--seeds`` and variant, ``--steps`` steps each, up to
   ``--jobs`` of them at once on the same GPU (their tok/s is not reported: they share it; peak memory and saved
   bytes are per process). Their results are merged into one ``fp8coat compare`` report per model
   (``<model>.md``, ``<model>.json``, ``<model>.png``: mean ± std over seeds).

Reported per model and variant (``vlm_compare.json`` and ``vlm_compare.md`` in ``--out``): final validation loss
(mean, std), its gap to the baseline (BF16 with torch's AdamW) in % per seed, the target ``max(0.5 %, one std of
the baseline's validation loss in %)``, held-out caption exact match (mean), saved-bytes ratios vision / LM to the
baseline, tok/s from the speed run, peak GiB and saved bytes from it or else from the first seed's accuracy runs.
Run folders (checkpoints included) go under ``--work-dir``.

Usage::

    python -m benchmarks.vlm_compare --out $OUT                         # on a CUDA GPU
    python -m benchmarks.vlm_compare --dry-run --out /tmp/vlm           # tiny-llava, a few steps on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import fmt  # noqa: E402
from benchmarks.provenance import gpu_name, run_meta  # noqa: E402
from fp8coat.train.compare import _mean_std, merge_records, write_reports  # noqa: E402

# per model: sequence length (image tokens + the longest prompt and caption) — llava-100m takes 256 image tokens,
# qwen2vl-100m 64, tiny-llava 16
SEQ_LEN = {"llava-100m": 320, "qwen2vl-100m": 128, "tiny-llava": 48, "tiny-qwen2vl": 48}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default="llava-100m,qwen2vl-100m", help="comma-separated VLM presets")
    ap.add_argument("--data", default="synthetic", help="fp8coat compare --data")
    ap.add_argument("--variants", default="bf16-torchopt,coat", help="fp8coat compare --variants (baseline first)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the accuracy runs")
    ap.add_argument("--steps", type=int, default=1000, help="steps of each accuracy run (0: no accuracy runs)")
    ap.add_argument("--speed-steps", type=int, default=60, help="steps of the speed run (0: none)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of every run")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="linear warm-up steps of every run (default: a tenth of --steps, at least 1)")
    ap.add_argument("--caption-eval", type=int, default=256, help="held-out records captioned per accuracy run")
    ap.add_argument("--jobs", type=int, default=6, help="accuracy runs at once")
    ap.add_argument("--extra", default="", help="more fp8coat compare arguments for every run, space-separated "
                    "(write --extra=--flag when the first one begins with -)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="after this many seconds, running compares are interrupted (finished runs are kept)")
    ap.add_argument("--out", default="/tmp/fp8coat_vlm", help="where the reports go")
    ap.add_argument("--work-dir", default=None, help="run folders (default: <out>/runs)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny-llava, 4 steps, 2 seeds, on the CPU: checks the wiring")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.speed_steps < 0 or not (args.steps or args.speed_steps):
        ap.error("--steps and --speed-steps are >= 0 and not both 0")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        ap.error("--warmup-steps is >= 0")
    if args.dry_run:
        args.models, args.steps, args.speed_steps, args.seeds = "tiny-llava", 4, 3, "0,1"
        args.batch_size, args.caption_eval, args.jobs = 4, 2, 2
        args.extra = (args.extra + " --device cpu --eval-batches 1").strip()
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.work_dir = args.work_dir or os.path.join(args.out, "runs")
    return args


def compare_command(args, model: str, variants: list[str], seeds: list[int], steps: int, out_dir: str, *,
                    speed: bool) -> list[str]:
    cmd = [sys.executable, "-m", "fp8coat", "compare", "--model", model, "--data", args.data,
           "--variants", ",".join(variants), "--seeds", ",".join(map(str, seeds)), "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(SEQ_LEN.get(model, 320)), "--lr", str(args.lr),
           "--warmup-steps", str(min(args.warmup_steps, steps)), "--out-dir", out_dir]
    if speed:
        cmd += ["--caption-eval", "0", "--eval-every", "0", "--log-every", "5"]
    else:  # runs sharing the machine: the CPUs split between them for encoding batches
        workers = max(1, (os.cpu_count() or 2) // (2 * max(1, args.jobs)))
        cmd += ["--caption-eval", str(args.caption_eval), "--eval-every", str(max(1, steps // 8)),
                "--data-workers", str(workers)]
    return cmd + args.extra.split()


def run_all(commands: list[tuple[str, list[str]]], jobs: int, deadline: float) -> dict[str, int]:
    """Run ``(log path, command)`` pairs, at most ``jobs`` at once; returns each log path's exit status. At
    ``deadline`` (``time.time()``) the running ones get SIGINT (a compare keeps the runs it finished) and the
    pending ones are dropped."""
    pending, running, status = list(commands), {}, {}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
    while pending or running:
        while pending and len(running) < jobs:
            log_path, cmd = pending.pop(0)
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log_file = open(log_path, "w")
            print("start:", " ".join(cmd[1:]), f"(log {log_path})", flush=True)
            running[log_path] = (subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                                 log_file)
        time.sleep(0.5)
        if time.time() > deadline and (pending or running):
            print(f"time budget spent: interrupting {len(running)} runs, dropping {len(pending)}", flush=True)
            status.update({log_path: -1 for log_path, _ in pending})
            pending = []
            for proc, _ in running.values():
                proc.send_signal(signal.SIGINT)
            deadline = float("inf")
        for log_path, (proc, log_file) in list(running.items()):
            if proc.poll() is not None:
                log_file.close()
                status[log_path] = proc.returncode
                print(f"done ({proc.returncode}): {log_path}", flush=True)
                del running[log_path]
    return status


def load_compare(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "compare.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ratio(run: dict, baseline: dict, key: str) -> float | None:
    a, b = run.get(key), baseline.get(key)
    return a / b if a is not None and b else None


def model_rows(merged: dict, speed: dict | None) -> list[dict]:
    """Per variant: accuracy over seeds from ``merged``; tok/s from ``speed``'s runs (alone on the GPU); peak
    memory and saved bytes from ``speed``'s runs too, else from the variant's first accuracy run (both are counted
    per process, so runs sharing the GPU give them right)."""
    baseline = merged["baseline"]
    base_runs = {r["seed"]: r for r in merged["results"].get(baseline, [])}
    base_val = [r.get("final_val_loss") for r in base_runs.values()]
    base_mean, base_std = _mean_std(base_val)
    target = max(0.5, 100 * base_std / base_mean) if base_mean else None
    speed_runs = {v: (runs[0] if runs else {}) for v, runs in (speed or {}).get("results", {}).items()}
    base_speed = speed_runs.get(baseline, {})
    base_first = merged["results"].get(baseline) or [{}]
    base_memory = base_speed or base_first[0]
    rows = []
    for variant, runs in merged["results"].items():
        val_mean, val_std = _mean_std([r.get("final_val_loss") for r in runs])
        gaps = [100 * (r["final_val_loss"] / base_runs[r["seed"]]["final_val_loss"] - 1) for r in runs
                if r.get("final_val_loss") is not None and base_runs.get(r["seed"], {}).get("final_val_loss")]
        gap_mean, gap_std = _mean_std(gaps)
        fast = speed_runs.get(variant, {})
        memory = fast or (runs[0] if runs else {})
        rows.append({
            "variant": variant, "label": merged["labels"].get(variant, variant), "seeds": [r["seed"] for r in runs],
            "val_loss_mean": val_mean, "val_loss_std": val_std, "val_gap_pct": gaps, "val_gap_pct_mean": gap_mean,
            "val_gap_pct_std": gap_std, "target_pct": target,
            "within_target": (abs(gap_mean) <= target) if variant != baseline and gaps and target else None,
            "caption_exact_match": _mean_std([r.get("caption_exact_match") for r in runs])[0],
            "tok_per_s": fast.get("tok_per_s"), "tok_per_s_ratio": _ratio(fast, base_speed, "tok_per_s"),
            "memory_from": "speed run" if fast else ("accuracy run" if runs else None),
            "peak_mem_gib": memory.get("peak_mem_gib"), "peak_mem_ratio": _ratio(memory, base_memory, "peak_mem_gib"),
            "saved_vision_bytes": memory.get("saved_vision_bytes"),
            "saved_vision_ratio": _ratio(memory, base_memory, "saved_vision_bytes"),
            "saved_lm_bytes": memory.get("saved_lm_bytes"),
            "saved_lm_ratio": _ratio(memory, base_memory, "saved_lm_bytes"),
        })
    return rows


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# fp8coat VLM compare ({meta.get('device', '?')}, {meta['date']}, commit {meta['commit']})", "",
             f"`{meta['command']}`", "",
             "| model | variant | seeds | val loss (mean ± std) | val gap % (per seed) | target % | caption EM | "
             "tok/s | × | peak GiB | × | saved vision × | saved LM × |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, entry in results.items():
        for r in entry["rows"]:
            gaps = ", ".join(f"{g:+.2f}" for g in r["val_gap_pct"])
            lines.append(
                f"| {model} | {r['variant']} | {len(r['seeds'])} | {fmt(r['val_loss_mean'], '.4f')} ± "
                f"{fmt(r['val_loss_std'], '.4f')} | {fmt(r['val_gap_pct_mean'], '+.2f')} ({gaps}) | "
                f"{fmt(r['target_pct'], '.2f')} | {fmt(r['caption_exact_match'], '.3f')} | "
                f"{fmt(r['tok_per_s'], ',.0f')} | {fmt(r['tok_per_s_ratio'], '.2f')} | "
                f"{fmt(r['peak_mem_gib'], '.2f')} | {fmt(r['peak_mem_ratio'], '.2f')} | "
                f"{fmt(r['saved_vision_ratio'], '.3f')} | {fmt(r['saved_lm_ratio'], '.3f')} |")
        for problem in entry["problems"]:
            lines.append(f"\n{model}: {problem}")
    lines += ["", "val gap: 100 × (val loss / the baseline's with the same seed − 1); target: max(0.5 %, one std of "
              "the baseline's val loss in %). tok/s from a run alone on the GPU (speed run), peak and saved bytes "
              "from it too or else from the first seed's accuracy run; ×: over the baseline (first variant). "
              "Per-model reports: `<model>.md`, loss curves `<model>.png`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = {**run_meta("benchmarks.vlm_compare", argv), "device": gpu_name() or "cpu"}
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    status = {}
    if args.speed_steps:  # alone on the GPU; also fills the data and tokenizer caches before runs go in parallel
        for model in args.models:
            status.update(run_all([(os.path.join(args.work_dir, model, "speed.log"),
                                    compare_command(args, model, args.variants, args.seeds[:1], args.speed_steps,
                                                    os.path.join(args.work_dir, model, "speed"), speed=True))],
                                  1, deadline))
    print(f"speed runs done in {time.time() - start:.0f}s", flush=True)
    accuracy = [(os.path.join(args.work_dir, model, f"{variant}_seed{seed}.log"),
                 compare_command(args, model, [variant], [seed], args.steps,
                                 os.path.join(args.work_dir, model, f"{variant}_seed{seed}"), speed=False))
                for model in args.models for seed in args.seeds for variant in args.variants] if args.steps else []
    status.update(run_all(accuracy, args.jobs, deadline))
    print(f"accuracy runs done in {time.time() - start:.0f}s", flush=True)

    results = {}
    for model in args.models:
        problems = [f"{os.path.relpath(log, args.work_dir)} exited {rc}" for log, rc in status.items()
                    if rc != 0 and os.path.dirname(log) == os.path.join(args.work_dir, model)]
        records = [rec for seed in args.seeds for variant in args.variants
                   if (rec := load_compare(os.path.join(args.work_dir, model, f"{variant}_seed{seed}"))) is not None]
        speed = load_compare(os.path.join(args.work_dir, model, "speed")) if args.speed_steps else None
        if not records:
            if args.steps:
                problems.append("no accuracy run finished")
            empty = {"variants": args.variants, "baseline": args.variants[0], "labels": {},
                     "results": {v: [] for v in args.variants}}
            results[model] = {"rows": model_rows(empty, speed), "problems": problems}
            continue
        merged = merge_records(records, args.variants)
        write_reports(args.out, merged, names=(f"{model}.md", f"{model}.json", f"{model}.png"))
        results[model] = {"rows": model_rows(merged, speed), "problems": problems, "config": merged["config"]}
    with open(os.path.join(args.out, "vlm_compare.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "seconds": time.time() - start}, f, indent=1)
    text = markdown(results, meta)
    with open(os.path.join(args.out, "vlm_compare.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(rc == 0 for rc in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
