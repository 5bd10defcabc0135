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
    """Median / min / max ms of ``fn`` after ``warmup`` calls; CUDA events around each call, synchronized.
    On CUDA also ``host_ms``: median host time until ``fn`` returns (what the GPU waits for before it starts)."""
    for _ in range(warmup):
        fn()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    times, host = [], []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}
    if host:
        out["host_ms"] = statistics.median(host)
    return out


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


def launch_graph_us(fn, launches: int = 20, repeats: int = 7) -> float:
    """µs per call of ``fn`` (a few kernel launches) from replays of one CUDA graph holding ``launches`` calls:
    the median over ``repeats`` replays. Device time of small kernels, without launch gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocations) off the default stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(launches):
            fn()
    return statistics.median(time_back_to_back_ms(graph.replay, "cuda", 1) * 1e3 / launches for _ in range(repeats))


def graph_replay_ms(fn, iters: int, repeats: int = 5) -> "float | None":
    """Median over ``repeats`` of the mean ms of ``iters`` back-to-back replays of a CUDA graph of ``fn`` (launch
    gaps removed: the device-side cost of ``fn``). None, with the reason logged, when ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):  # the warmed-up stream (per-stream library workspaces exist)
            fn()
    except Exception as ex:  # noqa: BLE001 - report and go on: the other timings stand
        log(f"  (no graph timing: {type(ex).__name__}: {str(ex)[:200]})")
        return None
    times = [time_back_to_back_ms(graph.replay, "cuda", iters) for _ in range(repeats)]
    del graph
    return statistics.median(times)


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

