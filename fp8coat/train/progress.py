"""Run output: a JSONL metrics log, a one-line progress display (loss, tok/s, memory) on stderr and the
end-of-run summary as a few readable lines."""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["MetricsLog", "Progress", "format_summary", "human_bytes", "human_count", "nonfinite_note"]


def human_count(n: float) -> str:
    """``7``, ``850``, ``3.2k``, ``48.1k``, ``4.9M``, ``2.5B``."""
    if abs(n) < 999.5:
        return f"{n:.0f}"
    for suffix, scale in (("k", 1e3), ("M", 1e6)):
        if abs(n) < 999.95 * scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n / 1e9:.1f}B"


def human_bytes(n: float, digits: int = 1) -> str:
    """``512 B``, ``3.4 KiB``, ``12.0 MiB``, ``1.5 GiB`` (``digits`` decimals)."""
    if n < 1024:
        return f"{n:.0f} B"
    for suffix, scale in (("KiB", 2**10), ("MiB", 2**20)):
        if n < 1024 * scale:
            return f"{n / scale:.{digits}f} {suffix}"
    return f"{n / 2**30:.{digits}f} GiB"


def format_summary(summary: dict, out_dir: str) -> str:
    """The end-of-run summary (``summary.json``) as a few lines: the losses, the throughput, steps with non-finite
    gradients (when there were any) and the memory."""
    window = summary.get("final_train_window")
    rows = [
        ("validation loss", _loss(summary.get("final_val_loss"))),
        (f"train loss (mean of last {window} steps)" if window else "train loss (mean of the last steps)",
         _loss(summary.get("final_train_loss"))),
        ("throughput", f"{human_count(summary['tok_per_s'])} tok/s (median of the logged intervals)"
         if summary.get("tok_per_s") else "–"),
        ("optimizer state", human_bytes(summary["optimizer_state_bytes"])),
    ]
    note = nonfinite_note(summary.get("nonfinite_grad_steps"), summary.get("nonfinite_grad_elements"))
    if note:
        rows.append(("non-finite gradients", note))
    if "peak_mem_gib" in summary:
        rows.append(("peak GPU memory", f"{summary['peak_mem_gib']:.2f} GiB"))
    if "saved_vision_bytes" in summary:
        parts = (f"{human_bytes(summary['saved_activation_bytes'])} = vision "
                 f"{human_bytes(summary['saved_vision_bytes'])} + LM {human_bytes(summary['saved_lm_bytes'])}")
        rows.append(("saved for backward (1 micro-batch)", parts))
    elif "saved_activation_bytes" in summary:
        rows.append(("saved for backward (1 micro-batch)", human_bytes(summary["saved_activation_bytes"])))
    if summary.get("caption_exact_match") is not None:
        rows.append(("captions, exact match", f"{summary['caption_exact_match']:.1%} of held-out records"))
    if summary.get("fp8_weight_copy_bytes"):
        rows.append(("FP8 weight copies (held)", human_bytes(summary["fp8_weight_copy_bytes"])))
    width = max(len(name) for name, _ in rows)
    head = (f"{summary['recipe']} + {summary['optimizer']} optimizer, {human_count(summary['params'])} params, "
            f"{summary['steps']} steps ({os.path.join(out_dir, 'summary.json')}):")
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


def _loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def nonfinite_note(steps: int | None, elements: int | None) -> str | None:
    """``"2 steps with non-finite gradients, 3.4k gradient elements skipped"`` (either part alone when the other is
    0 or None); None when both are."""
    parts = []
    if steps:
        parts.append(f"{steps} step{'s' if steps != 1 else ''} with non-finite gradients")
    if elements:
        parts.append(f"{human_count(elements)} gradient element{'s' if elements != 1 else ''} skipped")
    return ", ".join(parts) or None


def _parse(line: bytes) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a metrics line, ``(None, what is wrong)`` for a damaged one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "it is not UTF-8 text"
    except ValueError:
        return None, "it is not JSON (cut off?)"
    if not isinstance(record, dict):
        return None, "it is not a JSON object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return None, f"its \"step\" is {json.dumps(step)}, expected an integer >= 1"
    return record, None


def _lines(path: str) -> list[tuple[int, dict | None, str | None]]:
    """``(line number, record, problem)`` of every non-blank line of the log at ``path``."""
    with open(path, "rb") as f:
        return [(n, *_parse(line)) for n, line in enumerate(f, start=1) if line.strip()]


def _damaged(path: str, n: int, problem: str) -> ValueError:
    return ValueError(f"{path} line {n} is damaged: {problem}")


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed, so a crashed run keeps its history).

    Opening it keeps the history up to step ``truncate_after_step`` (0 for a fresh run: an empty log; the
    checkpoint's step when resuming): the lines up to the last record of a step <= ``truncate_after_step``,
    without records of later steps. The lines after it are dropped whatever they hold (such as the half-written
    last line of a run killed while writing it); a damaged line within the kept history (not UTF-8, not a JSON
    object, no integer ``step``) is a ValueError naming the file and the line."""

    def __init__(self, path: str, truncate_after_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            kept = self._history(path, truncate_after_step)
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._f = open(path, "a")  # noqa: SIM115 -- appended to until close()

    @staticmethod
    def _history(path: str, up_to_step: int) -> list[dict]:
        lines = _lines(path)
        end = max((i + 1 for i, (_, r, _) in enumerate(lines) if r is not None and r["step"] <= up_to_step),
                  default=0)
        for n, record, problem in lines[:end]:
            if record is None:
                raise ValueError(f"{_damaged(path, n, problem)}; it lies within the history up to step "
                                 f"{up_to_step} that the run keeps: repair or delete the line, then run again")
        return [r for _, r, _ in lines[:end] if r["step"] <= up_to_step]

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: str) -> list[dict]:
        """Every record of the log; ValueError naming the file and the line if one is damaged."""
        records = []
        for n, record, problem in _lines(path):
            if record is None:
                raise _damaged(path, n, problem)
            records.append(record)
        return records


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
            elif k == "nonfinite":  # a nonfinite_note
                parts.append(v)
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
