"""Run output: a JSONL metrics log, a one-line progress display (loss, tok/s, memory) on stderr and the
end-of-run summary as a few readable lines."""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["MetricsLog", "Progress", "human_count", "human_bytes", "format_summary"]


def human_count(n: float) -> str:
    """``7``, ``850``, ``3.2k``, ``48.1k``, ``4.9M``, ``2.5B``."""
    if abs(n) < 999.5:
        return f"{n:.0f}"
    for suffix, scale in (("k", 1e3), ("M", 1e6)):
        if abs(n) < 999.95 * scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n / 1e9:.1f}B"


def human_bytes(n: float) -> str:
    """``512 B``, ``3.4 KiB``, ``12.0 MiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    for suffix, scale in (("KiB", 2**10), ("MiB", 2**20)):
        if n < 1024 * scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n / 2**30:.1f} GiB"


def format_summary(summary: dict, out_dir: str) -> str:
    """The end-of-run summary (``summary.json``) as a few lines: the losses, the throughput and the memory."""
    window = summary.get("final_train_window")
    rows = [
        ("validation loss", _loss(summary.get("final_val_loss"))),
        (f"train loss (mean of last {window} steps)" if window else "train loss (mean of the last steps)",
         _loss(summary.get("final_train_loss"))),
        ("throughput", f"{human_count(summary['tok_per_s'])} tok/s (median of the logged intervals)"
         if summary.get("tok_per_s") else "–"),
        ("optimizer state", human_bytes(summary["optimizer_state_bytes"])),
    ]
    if "peak_mem_gib" in summary:
        rows.append(("peak GPU memory", f"{summary['peak_mem_gib']:.2f} GiB"))
    if "saved_activation_bytes" in summary:
        rows.append(("saved for backward (1 micro-batch)", human_bytes(summary["saved_activation_bytes"])))
    width = max(len(name) for name, _ in rows)
    head = (f"{summary['recipe']} + {summary['optimizer']} optimizer, {human_count(summary['params'])} params, "
            f"{summary['steps']} steps ({os.path.join(out_dir, 'summary.json')}):")
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


def _loss(value: "float | None") -> str:
    return "–" if value is None else f"{value:.4f}"


def _parse(line: str) -> "dict | None":
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed, so a crashed run keeps its history).

    Records with ``step`` > ``truncate_after_step`` are dropped first (0 for a fresh run: an empty log; the
    checkpoint's step when resuming: the history up to it is kept), and so is a line that does not parse (the
    last one of a run killed while writing it)."""

    def __init__(self, path: str, truncate_after_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                kept = [json.dumps(r) + "\n" for r in map(_parse, f) if r is not None
                        and r.get("step", 0) <= truncate_after_step]
            with open(path, "w") as f:
                f.writelines(kept)
        self._f = open(path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: str) -> "list[dict]":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


class Progress:
    """``[label] step 120/500 | loss 3.412 | lr 1.2e-03 | 48.1k tok/s | 3.2 GiB | eta 1m12s``. The time left is
    estimated from the steps since ``start`` (the step a resumed run started at)."""

    def __init__(self, total: int, label: str, stream=None, start: int = 0):
        self.total, self.label, self.start = total, label, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()

    def update(self, step: int, **fields) -> None:
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        parts = [f"[{self.label}] step {step}/{self.total}"]
        for k, v in fields.items():
            if v is None:
                continue
            if k == "tok_per_s":
                parts.append(f"{human_count(v)} tok/s")
            elif k == "mem_gib":
                parts.append(f"{v:.1f} GiB")
            elif k == "lr":
                parts.append(f"lr {v:.1e}")
            else:
                parts.append(f"{k.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
