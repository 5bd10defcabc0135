"""Shared helpers of the GPU benchmarks: timing (warm-up, then CUDA events around each call, or a host clock on
the CPU; median / min / max in milliseconds), stopping on a time limit, the final save and summary."""

from __future__ import annotations

import statistics
import time

import torch


def log(*args) -> None:
    print(*args, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int, iters: int) -> dict:
    """Median / min / max ms of ``fn`` after ``warmup`` calls; CUDA events around each call, synchronized."""
    for _ in range(warmup):
        fn()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def time_back_to_back_ms(fn, device, iters: int) -> float:
    """Mean ms of ``iters`` calls issued back to back (host overhead shows here)."""
    sync(device)
    if torch.device(device).type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def stop_on_sigterm() -> None:
    """A time limit (SIGTERM) raises SystemExit, so that a benchmark still saves and prints what it measured."""
    import signal

    def on_term(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def finish(bench, name: str, table: str, json_path: str) -> None:
    """Record the total time, save ``bench.res`` (``bench.save()``) and print the summary table."""
    bench.res["total_s"] = time.time() - bench.t_start
    bench.save()
    log(f"\n=== {name} ===")
    log(table)
    log(f"total {bench.res['total_s']:.0f}s; json: {json_path}")


def problem_lines(res: dict, skipped_label: str = "skipped") -> "list[str]":
    """The errors and skipped runs of a benchmark's results, as summary-table footer lines."""
    lines = []
    if res["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v[:160]}" for k, v in res["errors"].items())]
    if res["skipped"]:
        lines += [f"{skipped_label}: " + ", ".join(res["skipped"])]
    return lines

