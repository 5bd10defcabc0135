"""The one helper of the benchmarks: timing (warm-up, then CUDA events around each call, or a host clock on the
CPU; median / min / max in milliseconds), the :class:`Bench` bookkeeping (a time budget for optional runs, one
failing run never stopping the others, the results saved as JSON after every run, stopping on SIGTERM, the final
summary) and the command-line arguments every benchmark shares."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import traceback

import torch


def log(*args) -> None:
    print(*args, flush=True)


def fmt(value, spec: str, missing: str = "-") -> str:
    """``format(value, spec)`` for a table cell; ``missing`` where the value is None."""
    return missing if value is None else format(value, spec)


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


def graph_replay_ms(fn, iters: int, repeats: int = 5) -> float | None:
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


def problem_lines(res: dict, skipped_label: str = "skipped") -> list[str]:
    """The errors and skipped runs of a benchmark's results, as summary-table footer lines."""
    lines = []
    if res["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v[:160]}" for k, v in res["errors"].items())]
    if res["skipped"]:
        lines += [f"{skipped_label}: " + ", ".join(res["skipped"])]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_common_args(ap: argparse.ArgumentParser, *, steps: int, steps_help: str, budget_s: float, budget_help: str,
                    sections_help: str, dry_run_help: str) -> None:
    """The arguments every benchmark has: ``--steps --warmup --device --out --budget-s --sections --dry-run``."""
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.gettempdir())
    ap.add_argument("--budget-s", type=float, default=budget_s, help=budget_help)
    ap.add_argument("--sections", default="", help=sections_help)
    ap.add_argument("--dry-run", action="store_true", help=dry_run_help)


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """After a benchmark's own ``--dry-run`` settings: the device (cuda if available), the section list, ``--out``
    created."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.sections = [s for s in args.sections.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    return args


# ---------------------------------------------------------------------------------------------------------------
# bookkeeping


class Bench:
    """Arguments, results and the run bookkeeping of one benchmark process; every measured variant runs under
    :meth:`attempt`. ``res`` holds at least ``config``, ``errors`` and ``skipped``; it is written to
    ``<args.out>/<json_name>`` after every run and by :meth:`finish`."""

    json_name = "bench.json"

    def __init__(self, args, res: dict, meta: dict | None = None):
        self.args = args
        self.device = args.device
        self.cuda = torch.device(self.device).type == "cuda"
        self.res = res
        if meta is not None:
            self.res["meta"] = meta
        self.t_start = time.time()

    @property
    def json_path(self) -> str:
        return os.path.join(self.args.out, self.json_name)

    def save(self) -> None:
        with open(self.json_path, "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def attempt(self, name: str, fn, *, optional: bool = True, cost_s: float = 0.0, on_oom=None, cleanup=None) -> None:
        """Run ``fn`` as the run ``name``. Optional runs are skipped once the elapsed time plus ``cost_s`` (their
        estimated extra cost) exceeds ``args.budget_s``; an ImportError (package absent) skips the run; any other
        exception is recorded under ``res['errors']`` and never raised (``on_oom()`` is called first for an
        out-of-memory error). Then ``cleanup()``, freed memory and the JSON saved."""
        elapsed = time.time() - self.t_start
        if optional and elapsed + cost_s > self.args.budget_s:
            log(f"[{name}] skipped: {elapsed:.0f}s elapsed" + (f" + ~{cost_s:.0f}s" if cost_s else "")
                + f" > budget {self.args.budget_s:.0f}s")
            self.res["skipped"].append(f"{name} (budget)")
            return
        log(f"[{name}] ...")
        t0 = time.time()
        try:
            fn()
        except ImportError as ex:
            self.res["skipped"].append(f"{name} ({ex})")
            log(f"[{name}] skipped: {ex}")
        except torch.OutOfMemoryError as ex:
            if on_oom is not None:
                on_oom()
            self.res["errors"][name] = "out of memory: " + str(ex)[:200]
            log(f"[{name}] OUT OF MEMORY")
        except Exception as ex:  # noqa: BLE001 - one failing run must not stop the others
            self.res["errors"][name] = repr(ex)[:500]
            log(f"[{name}] FAILED: {ex!r}")
            traceback.print_exc()
        if cleanup is not None:
            cleanup()
        self.free()
        log(f"[{name}] {time.time() - t0:.1f}s")
        self.save()

    def main_loop(self, runs) -> None:
        """Call ``runs()`` (the benchmark's runs, most important first) with SIGTERM turned into SystemExit: a time
        limit stops the runs, and what was measured is still saved and summarized."""
        stop_on_sigterm()
        try:
            runs()
        except SystemExit as ex:
            self.res["errors"]["stopped"] = str(ex)
            log(str(ex))

    def finish(self, title: str, table: str) -> None:
        """Record the total time, save the results and print the summary table."""
        self.res["total_s"] = time.time() - self.t_start
        self.save()
        log(f"\n=== {title} ===")
        log(table)
        log(f"total {self.res['total_s']:.0f}s; json: {self.json_path}")
