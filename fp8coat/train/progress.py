"""Run output: a JSONL metrics log and a one-line progress display (loss, tok/s, memory) on stderr."""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["MetricsLog", "Progress"]


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed, so a crashed run keeps its history).

    Records with ``step`` > ``truncate_after_step`` are dropped first (0 for a fresh run: an empty log; the
    checkpoint's step when resuming: the history up to it is kept)."""

    def __init__(self, path: str, truncate_after_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
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
    """``[label] step 120/500 | loss 3.412 | lr 1.2e-03 | 48.1k tok/s | 3.2 GiB | eta 1m12s``."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()

    def update(self, step: int, **fields) -> None:
        elapsed = time.time() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        parts = [f"[{self.label}] step {step}/{self.total}"]
        for k, v in fields.items():
            if v is None:
                continue
            if k == "tok_per_s":
                parts.append(f"{v / 1000:.1f}k tok/s")
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
