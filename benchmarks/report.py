"""The tables of ``docs/benchmarks.md``, generated from the result files under ``docs/results/<benchmark>/``.

Each table row is the most recent measurement of one variant: its value, the anchor measured in the same run (for
compile times, which each library measures in its own process: on the same GPU model), their ratio, and where the
row comes from (date, commit, GPU, the run's file; the run's command is listed below the table). Older files of the
same folder show up as "earlier runs" of a row in the tables with that column. A row's provenance is the result file's
own ``meta`` (written by the benchmarks since they record it) or its entry in the folder's ``runs.json``.

Folders and what is read from them:

* ``optimizer/``: ``bench_optimizer`` JSON (``python -m benchmarks.bench_optimizer``): the optimizer step.
* ``layers/``: ``bench_layers`` JSON: the FP8 linear, decoder layer and 4-layer model tables.
* ``accuracy/``: ``fp8coat compare`` JSON named ``<stage>-<tag>.json`` (stage ``pretrain`` or ``finetune``).
* ``cpu_compare/``: ``fp8coat compare`` JSON of the CPU comparison (``make compare``).
* ``llama7b/``: ``benchmarks.llama7b`` JSON: the full 7B model's largest batch and its tok/s per row and sequence
  length.
* ``compile_time/``: ``benchmarks.compile_time`` JSON (``compile_time[-<library>][-eager][-<tag>].json``; no
  ``meta``: date, commit and GPU come from ``runs.json``): build → first steps, against torchao of the same GPU.
* ``vlm/``: ``benchmarks.vlm_compare``'s ``vlm_compare*.json`` (the per-model compare reports beside it are not
  read): BF16 against coat on vision-language models.

A missing or empty folder gives its table as "no result yet". A ``--dry-run`` result (flagged in its ``config`` or
run by a command with ``--dry-run``) is refused: tiny shapes, not a measurement.

Usage, from the repository root::

    python -m benchmarks.report            # rewrite the generated parts of docs/benchmarks.md
    python -m benchmarks.report --check    # exit 1 if docs/benchmarks.md is not what the results give
    python -m benchmarks.report --print    # print the generated parts

The generated parts sit between ``<!-- report:<table> begin -->`` and ``<!-- report:<table> end -->`` lines; the
text around them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

ANCHOR_MISSING = "no anchor in this run"  # shown where a row's anchor was not measured in the same run
UNKNOWN = "?"  # a provenance field nobody recorded

# targets the tables are checked against (bench_layers prints the same model4 check)
TARGET_TOK_S, TARGET_PEAK_GIB = 120e3, 9.5  # 4-layer model, fp8coat rows
TARGET_PCT_COPY = 75.0  # optimizer step, % of the device-to-device copy bandwidth
TARGET_LINEAR_X = 1.5  # FP8 linear fwd+bwd, BF16 time / FP8 time
TARGET_ACCURACY_GAP_PCT = 0.3  # coat's val-loss gap to BF16: within max(this, one BF16 std)


class ReportError(ValueError):
    """A result file that cannot be read or lacks what its table needs; the message names the file."""


@dataclass
class Run:
    """One result file: its data and where it comes from."""

    path: Path
    data: dict
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def key(self) -> tuple:
        return (str(self.meta.get("date") or ""), self.path.name)

    def cells(self) -> list[str]:
        """The date, commit, GPU and run cells of a row from this run."""
        date = str(self.meta.get("date") or UNKNOWN).split(" ")[0]
        commit = self.meta.get("commit")
        return [date, f"`{commit}`" if commit else UNKNOWN, str(self.meta.get("gpu") or UNKNOWN), f"`{self.name}`"]

    def fail(self, what: str) -> ReportError:
        return ReportError(f"{self.path}: {what}")


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise ReportError(f"{path}: not a readable JSON file ({ex})") from ex


def _command(text: str) -> str:
    """A command recorded as ``sys.argv`` (``.../benchmarks/<name>.py args``) in today's form,
    ``python -m benchmarks.<name> args``; any other command unchanged."""
    first, _, rest = text.partition(" ")
    path = Path(first)
    if path.suffix == ".py" and path.parent.name == "benchmarks":
        return " ".join([f"python -m benchmarks.{path.stem}", *([rest] if rest else [])])
    return text


def _is_dry_run(data: dict, meta: dict) -> bool:
    """A ``--dry-run`` result: flagged in its config, or run by a command with ``--dry-run``."""
    commands = [meta.get("command"), data.get("command")]
    return bool((data.get("config") or {}).get("dry_run")) or any(
        isinstance(c, str) and "--dry-run" in c.split() for c in commands)


def load_runs(folder: Path, dry_runs: bool = False) -> list[Run]:
    """The result files of ``folder`` (``*.json`` except ``runs.json``), oldest first (by recorded date, then name).
    A missing folder has no runs. A ``--dry-run`` result is a ReportError unless ``dry_runs`` (tiny shapes, often
    on the CPU: it checks a table's wiring, it is no measurement)."""
    if not folder.is_dir():
        return []
    sidecar: dict = {}
    index = folder / "runs.json"
    if index.exists():
        data = _read_json(index)
        if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
            raise ReportError(f"{index}: expected an object with a \"files\" object")
        sidecar = data.get("files", {})
    runs = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "runs.json":
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object, found {type(data).__name__}")
        meta = dict(sidecar.get(path.name) or {})
        if not isinstance(data.get("meta") or {}, dict):
            raise ReportError(f"{path}: \"meta\" is {data['meta']!r}, expected an object")
        meta.update({k: v for k, v in (data.get("meta") or {}).items() if v is not None})
        if not dry_runs and _is_dry_run(data, meta):
            raise ReportError(f"{path}: a --dry-run result (tiny shapes on the CPU), not a measurement; remove it")
        if not meta.get("command") and isinstance(data.get("command"), str):  # compile_time: its sys.argv only
            meta["command"] = _command(data["command"])
        # the GPU: the file's env, else its device (the harness's config.device; vlm_compare's meta.device, which
        # names the GPU)
        gpu = (data.get("env") or {}).get("gpu")
        device = meta.get("device")
        if not gpu and "cpu" in ((data.get("config") or {}).get("device"), device):
            gpu = "none (CPU)"
        elif not gpu and isinstance(device, str) and device != UNKNOWN:
            gpu = device
        if gpu and not meta.get("gpu"):
            meta["gpu"] = gpu
        runs.append(Run(path, data, meta))
    return sorted(runs, key=lambda r: r.key)


def _rows(run: Run, *keys: str) -> dict:
    """``run.data[keys[0]][keys[1]]...``, which must be an object."""
    node = run.data
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise run.fail(f"no object at {'.'.join(keys[: i + 1])}")
        node = node[key]
    return node


def _entries(run: Run, key: str) -> list[dict]:
    """``run.data[key]``, which must be a list of objects."""
    node = run.data.get(key)
    if not isinstance(node, list):
        raise run.fail(f"no list at {key}")
    for i, entry in enumerate(node):
        if not isinstance(entry, dict):
            raise run.fail(f"{key}[{i}]: expected an object, found {entry!r}")
    return node


def _int(run: Run, row: dict, key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise run.fail(f"{where}: {key!r} is {value!r}, expected an integer")
    return value


def _num(run: Run, row: dict, key: str, where: str, required: bool = True) -> float | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise run.fail(f"{where}: {key!r} is {value!r}, expected a number")
    return float(value)


def latest(runs: list[Run], rows_of) -> dict:
    """``{key: (run, row, earlier)}`` for every row key over ``runs`` (oldest first): the newest run holding the
    key, its row, and the ``(run, row)`` pairs of the older runs holding it. Keys in the newest run's order."""
    found: dict = {}
    for run in reversed(runs):
        for key, row in rows_of(run).items():
            if key in found:
                found[key][2].insert(0, (run, row))
            else:
                found[key] = (run, row, [])
    return found


# ---------------------------------------------------------------------------------------------------------------
# formatting


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _x(value: float | None, anchor: float | None, higher_is_better: bool = True, spec: str = ".2f") -> str:
    """Speed-up against the anchor: value/anchor for rates, anchor/value for times."""
    if value is None:
        return "–"
    if anchor is None:
        return ANCHOR_MISSING
    return f"{format(value / anchor if higher_is_better else anchor / value, spec)}×"


def _gap(value: float | None, anchor: float | None) -> str:
    if value is None:
        return "–"
    if anchor is None:
        return ANCHOR_MISSING
    return f"{100 * (value / anchor - 1):+.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _commands(runs: list[Run]) -> list[str]:
    used = sorted({id(r): r for r in runs}.values(), key=lambda r: r.key)
    lines = ["", "Commands (from the repository root):", ""]
    for run in used:
        lines.append(f"- `{run.name}`: `{run.meta.get('command') or UNKNOWN}`")
    return lines


PROVENANCE = ["date", "commit", "GPU", "run"]


# ---------------------------------------------------------------------------------------------------------------
# tables

OPTIMIZER_LABELS = {
    "torch_fused_fp32": "torch `AdamW(fused=True)`, fp32",
    "fp8coat_fp32_exp": "**fp8coat.AdamW, E4M3 + expansion (default)**, fp32",
    "fp8coat_fp32_noexp": "fp8coat.AdamW, expansion off, fp32",
    "fp8coat_bf16-remainder_exp": "fp8coat.AdamW, bf16 params, `bf16-remainder`",
    "fp8coat_bf16-stochastic_exp": "fp8coat.AdamW, bf16 params, `bf16-stochastic`",
    "torch_fused_bf16": "torch `AdamW(fused=True)`, bf16",
    "torchao_AdamWFp8_fp32": "torchao `AdamWFp8`, fp32",
    "torchao_AdamW8bit_fp32": "torchao `AdamW8bit`, fp32",
    "bnb_AdamW8bit_fp32": "bitsandbytes `AdamW8bit`, fp32",
}
OPTIMIZER_ANCHOR = "torch_fused_fp32"


def optimizer_table(runs: list[Run]) -> list[str]:
    """Optimizer step: ms/step against torch's fused AdamW (fp32) of the same run."""
    if not runs:
        return ["(no results in `docs/results/optimizer/`)"]
    rows, used, pct_ok = [], [], []
    for key, (run, row, earlier) in latest(runs, lambda r: _rows(r, "rows")).items():
        where = f"rows.{key}"
        ms = _num(run, row, "ms", where)
        anchor_row = _rows(run, "rows").get(OPTIMIZER_ANCHOR)
        anchor = _num(run, anchor_row, "ms", f"rows.{OPTIMIZER_ANCHOR}") if anchor_row else None
        pct = _num(run, row, "pct_copy", where, required=False)
        others = []
        for old_run, old in earlier:
            old_anchor = _rows(old_run, "rows").get(OPTIMIZER_ANCHOR)
            old_ms = _num(old_run, old, "ms", where)
            others.append(f"{old_ms:.2f} ms ({_x(old_ms, old_anchor and old_anchor.get('ms'), False)})")
        rows.append([OPTIMIZER_LABELS.get(key, f"`{key}`"), f"{ms:.2f}", _f(anchor, ".2f"), _x(ms, anchor, False),
                     _f(_num(run, row, "ms_b2b", where, required=False), ".2f"),
                     "–" if pct is None else f"{pct:.0f}%",
                     _f(_num(run, row, "state_B_per_param", where, required=False), ".2f"),
                     "; ".join(others) or "–", *run.cells()])
        used.append(run)
        if key.startswith("fp8coat") and pct is not None:
            pct_ok.append((key, pct))
    header = ["optimizer", "ms/step", "anchor: torch fused fp32, ms/step (same run)", "× anchor", "b2b ms",
              "% of copy bandwidth", "state B/param", "earlier runs", *PROVENANCE]
    lines = _table(header, rows)
    if pct_ok:
        met = ", ".join(f"`{k}` {p:.0f}% {'met' if p >= TARGET_PCT_COPY else 'MISSED'}" for k, p in pct_ok)
        lines += ["", f"Target ≥ {TARGET_PCT_COPY:.0f}% of copy bandwidth (step timed alone): {met}."]
    return lines + _commands(used)


def _linear_rows(run: Run) -> dict:
    return {k: r for k, r in _rows(run, "rows", "linear").items() if r.get("impl") != "bf16" and not r.get("oom")}


def linear_table(runs: list[Run]) -> list[str]:
    """FP8 linear fwd+bwd: queued (back to back) and CUDA-graph times against BF16 of the same run."""
    runs = [r for r in runs if _rows(r, "rows", "linear")]
    if not runs:
        return ["(no linear rows in `docs/results/layers/`)"]

    def anchor_of(run: Run, row: dict) -> dict | None:
        linear = _rows(run, "rows", "linear")
        return linear.get(row.get("ref")) or linear.get(f"{row.get('shape')} bf16")

    rows, used, misses, checked = [], [], [], 0
    for key, (run, row, earlier) in latest(runs, _linear_rows).items():
        base = anchor_of(run, row) or {}
        cells, ratios = [], []
        for col in ("b2b_ms", "graph_ms"):
            value = _num(run, row, col, f"rows.linear.{key}", required=False)
            ref = _num(run, base, col, f"rows.linear.{row.get('ref')}", required=False) if base else None
            cells += [_f(value, ".3f"), _f(ref, ".3f"), _x(value, ref, False)]
            if value is not None and ref is not None:
                ratios.append(ref / value)
        others = []
        for old_run, old in earlier:
            old_base = anchor_of(old_run, old) or {}
            others.append(" / ".join(_x(old.get(c), old_base.get(c), False) for c in ("b2b_ms", "graph_ms")))
        rows.append([str(row.get("shape", key)), str(row.get("impl", "")), *cells, "; ".join(others) or "–",
                     *run.cells()])
        used.append(run)
        checked += bool(ratios)
        if ratios and min(ratios) < TARGET_LINEAR_X:
            misses.append(f"{row.get('shape', key)} {row.get('impl', '')} ({min(ratios):.2f}×)")
    header = ["shape", "variant", "queued ms", "BF16 queued ms", "×", "graph ms", "BF16 graph ms", "×",
              "earlier runs (× queued / graph)", *PROVENANCE]
    lines = _table(header, rows)
    verdict = ("not measured (no queued or graph timings)." if not checked else "met by every row." if not misses
               else "missed by " + ", ".join(misses) + "; met by the others.")
    lines += ["", f"Target ≥ {TARGET_LINEAR_X}× BF16 both ways: {verdict}"]
    return lines + _commands(used)


LAYER_LABELS = {
    "bf16": "BF16 eager",
    "fp8coat_fp8-linear": "fp8coat `fp8-linear` eager",
    "fp8coat_coat": "fp8coat `coat` eager",
    "fp8coat_coat_compiled": "**fp8coat `coat` compiled**",
    "bf16_compiled": "BF16 compiled",
    "torchao_fp8_compiled": "torchao float8 compiled",
}


def layer_table(runs: list[Run]) -> list[str]:
    """One decoder layer: fwd+bwd ms against BF16 eager of the same run; activation memory in U."""
    runs = [r for r in runs if _rows(r, "rows", "layer")]
    if not runs:
        return ["(no layer rows in `docs/results/layers/`)"]
    rows, used = [], []

    def layer_rows(run: Run) -> dict:
        return {k: r for k, r in _rows(run, "rows", "layer").items() if not r.get("oom")}

    for key, (run, row, earlier) in latest(runs, layer_rows).items():
        where = f"rows.layer.{key}"
        ms = _num(run, row, "ms", where)
        base = _rows(run, "rows", "layer").get(row.get("ref", "bf16"))
        anchor = _num(run, base, "ms", f"rows.layer.{row.get('ref', 'bf16')}") if base else None
        saved = _num(run, row, "saved_U", where, required=False)
        after = _num(run, row, "mem_fwd_U", where, required=False)
        memory = f"{saved:.2f} U" if saved is not None else (f"{after:.2f} U (after the forward)" if after else "–")
        others = []
        for old_run, old in earlier:
            old_base = _rows(old_run, "rows", "layer").get(old.get("ref", "bf16")) or {}
            others.append(f"{old['ms']:.2f} ms ({_x(old.get('ms'), old_base.get('ms'), False)})")
        rows.append([LAYER_LABELS.get(key, f"`{key}`"), f"{ms:.2f}", _f(anchor, ".2f"), _x(ms, anchor, False), memory,
                     "; ".join(others) or "–", *run.cells()])
        used.append(run)
    header = ["variant", "fwd+bwd ms", "anchor: BF16 eager ms (same run)", "× anchor", "activation memory",
              "earlier runs", *PROVENANCE]
    return _table(header, rows) + _commands(used)


MODEL4_LABELS = {
    "fp8coat_coat_compiled_stochastic_inbackward_chunkedloss":
        "**fp8coat `coat` compiled, `bf16-stochastic`, chunked loss, updates in backward**",
    "fp8coat_coat_compiled": "fp8coat `coat` compiled (default optimizer settings)",
    "torchao_fp8_compiled_adamwfp8": "torchao float8 compiled + `AdamWFp8`",
    "bf16amp_eager": "BF16 autocast eager + fused AdamW",
    "bf16amp_compiled": "BF16 autocast compiled + fused AdamW",
}
MODEL4_ANCHORS = ("torchao_fp8_compiled_adamwfp8", "bf16amp_eager")  # the first one the run measured


def model4_table(runs: list[Run]) -> list[str]:
    """4-layer model training: tok/s against torchao float8 (else BF16 eager) of the same run."""
    runs = [r for r in runs if _rows(r, "rows", "model4")]
    if not runs:
        return ["(no model4 rows in `docs/results/layers/`)"]

    def anchor_of(run: Run) -> tuple[str | None, float | None]:
        m = _rows(run, "rows", "model4")
        for name in MODEL4_ANCHORS:
            if m.get(name) and not m[name].get("oom"):
                return name, _num(run, m[name], "tok_per_s", f"rows.model4.{name}")
        return None, None

    def model_rows(run: Run) -> dict:
        return {k: r for k, r in _rows(run, "rows", "model4").items() if not r.get("oom")}

    rows, used, checks = [], [], []
    for key, (run, row, earlier) in latest(runs, model_rows).items():
        where = f"rows.model4.{key}"
        tps = _num(run, row, "tok_per_s", where)
        peak = _num(run, row, "peak_GiB", where, required=False)
        name, anchor = anchor_of(run)
        anchor_cell = f"{MODEL4_LABELS.get(name, name)}: {anchor:,.0f}" if name else "–"
        others = [f"{_num(r, o, 'tok_per_s', where):,.0f} ({_x(o.get('tok_per_s'), anchor_of(r)[1])})"
                  for r, o in earlier]
        rows.append([MODEL4_LABELS.get(key, f"`{key}`"), f"{tps:,.0f}", anchor_cell, _x(tps, anchor),
                     _f(peak, ".2f"), "; ".join(others) or "–", *run.cells()])
        used.append(run)
        if key.startswith("fp8coat"):
            ok_t, ok_m = tps >= TARGET_TOK_S, peak is not None and peak <= TARGET_PEAK_GIB
            checks.append(f"`{key}` {tps:,.0f} tok/s {'met' if ok_t else 'MISSED'}, {_f(peak, '.2f')} GiB "
                          f"{'met' if ok_m else 'MISSED'}")
    header = ["run", "tok/s", "anchor (same run), tok/s", "× anchor", "peak GiB", "earlier runs, tok/s (×)",
              *PROVENANCE]
    lines = _table(header, rows)
    if checks:
        lines += ["", f"Targets ≥ {TARGET_TOK_S:,.0f} tok/s and ≤ {TARGET_PEAK_GIB} GiB peak: " + "; ".join(checks)
                  + "."]
    return lines + _commands(used)


def _compare_results(run: Run) -> dict:
    results = _rows(run, "results")
    for variant, seeds in results.items():
        if not isinstance(seeds, list) or not seeds:
            raise run.fail(f"results.{variant}: expected a non-empty list of runs")
        for i, s in enumerate(seeds):
            if not isinstance(s, dict):
                raise run.fail(f"results.{variant}[{i}]: expected an object")
            _num(run, s, "final_val_loss", f"results.{variant}[{i}]")
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _compare_anchor(results: dict, names: tuple[str, ...]) -> tuple[str | None, list[float] | None]:
    for name in names:
        if name in results:
            return name, [s["final_val_loss"] for s in results[name]]
    return None, None


def _loss_cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.4f}" + (f" ± {std:.4f} ({len(values)} seeds)" if len(values) > 1 else "")


def accuracy_table(runs: list[Run]) -> list[str]:
    """Accuracy: final validation loss of each variant against BF16 (``bf16-torchopt``) of the same file."""
    if not runs:
        return ["(no results in `docs/results/accuracy/`)"]

    def stage_rows(run: Run) -> dict:
        stage = run.path.stem.split("-")[0]
        return {(stage, v): seeds for v, seeds in _compare_results(run).items()}

    rows, used, checks = [], [], []
    for (stage, variant), (run, seeds, _) in latest(runs, stage_rows).items():
        values = [s["final_val_loss"] for s in seeds]
        name, ref = _compare_anchor(_compare_results(run), ("bf16-torchopt", "bf16"))
        mean, ref_mean = statistics.fmean(values), (statistics.fmean(ref) if ref else None)
        peaks = [s["peak_mem_gib"] for s in seeds if s.get("peak_mem_gib") is not None]
        rows.append([stage, f"`{variant}`", _loss_cell(values), _loss_cell(ref) if ref else "–",
                     "–" if variant == name else _gap(mean, ref_mean), _f(max(peaks) if peaks else None, ".2f"),
                     *run.cells()])
        used.append(run)
        if variant == "coat" and ref and len(ref) > 1:
            bound = max(TARGET_ACCURACY_GAP_PCT, 100 * _mean_std(ref)[1] / ref_mean)
            gap = 100 * (mean / ref_mean - 1)
            checks.append(f"{stage}: {gap:+.2f}% {'met' if gap <= bound else 'MISSED'} (bound {bound:.2f}%)")
    header = ["stage", "variant", "final val loss", "anchor: BF16 (same run)", "gap", "peak GiB", *PROVENANCE]
    lines = _table(header, rows)
    if checks:
        lines += ["", f"Target: coat within max({TARGET_ACCURACY_GAP_PCT}%, one BF16 std) of BF16: "
                  + "; ".join(checks) + "."]
    return lines + _commands(used)


def cpu_compare_table(runs: list[Run]) -> list[str]:
    """CPU comparison (``make compare``): final validation loss and saved activations against ``bf16``."""
    if not runs:
        return ["(no results in `docs/results/cpu_compare/`)"]
    rows, used = [], []
    for variant, (run, seeds, _) in latest(runs, _compare_results).items():
        results = _compare_results(run)
        values = [s["final_val_loss"] for s in seeds]
        name, ref = _compare_anchor(results, ("bf16", "bf16-torchopt"))
        ref_mean = statistics.fmean(ref) if ref else None
        tps = [s["tok_per_s"] for s in seeds if s.get("tok_per_s") is not None]
        saved = [s["saved_activation_bytes"] for s in seeds if s.get("saved_activation_bytes") is not None]
        ref_saved = ([s["saved_activation_bytes"] for s in results[name] if s.get("saved_activation_bytes")]
                     if name else [])
        saved_cell = "–"
        if saved:
            saved_cell = f"{statistics.fmean(saved) / 2**20:.2f} MiB"
            if ref_saved and variant != name:
                saved_cell += f" ({statistics.fmean(saved) / statistics.fmean(ref_saved):.2f}×)"
        rows.append([f"`{variant}`", _loss_cell(values), _loss_cell(ref) if ref else "–",
                     "–" if variant == name else _gap(statistics.fmean(values), ref_mean),
                     _f(statistics.fmean(tps) if tps else None, ",.0f"), saved_cell, *run.cells()])
        used.append(run)
    header = ["variant", "final val loss", "anchor: bf16 (same run)", "gap", "tok/s", "saved for backward",
              "date", "commit", "machine", "run"]
    return _table(header, rows) + _commands(used)


def _no_result(folder: str) -> list[str]:
    return [f"(no result yet in `docs/results/{folder}/`)"]


LLAMA7B_TORCHAO = "torchao_fp8_compiled_adamwfp8"  # benchmarks.llama7b.TORCHAO_ROW
LLAMA7B_BF16 = "bf16amp_compiled"  # benchmarks.llama7b.BF16_ROW
# the full 7B model on one H200: fp8coat's largest batch per sequence length and its tok/s at seq 2048 (1.2× the
# torchao float8 anchor's 17,538 tok/s, 1.7× BF16 compiled's 12,140, both measured apart at seq 2048)
TARGET_7B_BATCH = {2048: 16, 4096: 8}
TARGET_7B_TOK_S = 21_000.0


def _llama7b_groups(run: Run) -> dict:
    """``{(row name, seq, compiled): [its (row, batch) entries]}`` of a ``benchmarks.llama7b`` result."""
    groups: dict = {}
    for i, entry in enumerate(_entries(run, "rows")):
        where = f"rows[{i}]"
        name = entry.get("row")
        if not isinstance(name, str) or not name:
            raise run.fail(f"{where}: 'row' is {name!r}, expected a row name")
        seq, _ = _int(run, entry, "seq", where), _int(run, entry, "batch", where)
        if not isinstance(entry.get("ok"), bool):
            raise run.fail(f"{where}: 'ok' is {entry.get('ok')!r}, expected true or false")
        if entry["ok"]:
            _num(run, entry, "tok_s", where)
        for key in ("peak_gib", "first_step_s"):
            _num(run, entry, key, where, required=False)
        groups.setdefault((name, seq, entry.get("compiled") is not False), []).append(entry)
    return groups


def _largest_fit(entries: list[dict]) -> tuple[dict | None, int | None, int | None]:
    """``(the successful entry of the largest batch or None, smallest batch out of memory, smallest batch that
    failed otherwise)``."""
    fits = [e for e in entries if e["ok"]]
    oom = [e["batch"] for e in entries if not e["ok"] and e.get("oom")]
    failed = [e["batch"] for e in entries if not e["ok"] and not e.get("oom")]
    return (max(fits, key=lambda e: e["batch"]) if fits else None, min(oom, default=None),
            min(failed, default=None))


def _fastest(entries: list[dict]) -> dict | None:
    """The successful entry with the highest tok/s (None if none fit): a larger batch is not always faster."""
    return max((e for e in entries if e["ok"]), key=lambda e: e["tok_s"], default=None)


def _llama7b_anchor(groups: dict, name: str, seq: int) -> float | None:
    """The best tok/s of row ``name`` at ``seq`` over its batches that fit, in the run of ``groups``; None if
    none."""
    for (row, row_seq, _), entries in groups.items():
        if (row, row_seq) == (name, seq) and (fastest := _fastest(entries)) is not None:
            return fastest["tok_s"]
    return None


def llama7b_table(runs: list[Run]) -> list[str]:
    """Llama-2-7B on one GPU (``benchmarks.llama7b``): per row and sequence length, the largest batch that fit, its
    tok/s, and the row's best tok/s over its batches against the best of torchao float8 and of BF16 compiled at the
    same sequence length in the same run."""
    if not runs:
        return _no_result("llama7b")
    found = latest(runs, _llama7b_groups)
    rows, used, checks = [], [], []
    for (name, seq, compiled), (run, entries, _) in sorted(found.items(), key=lambda kv: kv[0][1]):
        best, oom, failed = _largest_fit(entries)
        groups = _llama7b_groups(run)
        tps = best["tok_s"] if best else None
        fastest = _fastest(entries)
        top = fastest["tok_s"] if fastest else None
        batch = str(best["batch"]) if best else "–"
        batch += f" ({oom} OOM)" if oom is not None else ""
        batch += f" ({failed} failed)" if failed is not None else ""
        label = f"`{name}`" + (" (eager)" if not compiled and "eager" not in name else "")
        rows.append([label, str(seq), batch, _f(tps, ",.0f"),
                     f"{top:,.0f} ({fastest['batch']})" if fastest else "–",
                     _x(top, _llama7b_anchor(groups, LLAMA7B_TORCHAO, seq)),
                     _x(top, _llama7b_anchor(groups, LLAMA7B_BF16, seq)),
                     _f(best and best.get("peak_gib"), ".2f"), _f(best and best.get("first_step_s"), ".1f"),
                     *run.cells()])
        used.append(run)
        if name.startswith("fp8coat") and seq in TARGET_7B_BATCH:
            ok = best is not None and best["batch"] >= TARGET_7B_BATCH[seq]
            check = f"`{name}` seq {seq}: batch {best['batch'] if best else 'none'} {'met' if ok else 'MISSED'}"
            if seq == 2048:
                check += f", best {_f(top, ',.0f')} tok/s {'met' if (top or 0) >= TARGET_7B_TOK_S else 'MISSED'}"
            checks.append(check)
    header = ["row", "seq", "largest batch that fit (smallest out of memory)", "tok/s there", "best tok/s (batch)",
              "best × torchao float8 compiled's best (same run and seq)",
              "best × BF16 compiled's best (same run and seq)", "peak GiB at the largest batch",
              "first step s", *PROVENANCE]
    lines = _table(header, rows)
    lines += ["", f"Targets: fp8coat batch ≥ {TARGET_7B_BATCH[2048]} at seq 2048 and ≥ {TARGET_7B_TOK_S:,.0f} "
              "tok/s (1.2× torchao float8's 17,538, 1.7× BF16 compiled's 12,140, measured apart), batch ≥ "
              f"{TARGET_7B_BATCH[4096]} at seq 4096: "
              + ("; ".join(checks) if checks else "not measured (no fp8coat row at seq 2048 or 4096)") + "."]
    return lines + _commands(used)


COMPILE_LIBRARIES = {"fp8coat": "fp8coat", "torchao": "torchao float8 + `AdamWFp8`",
                     "bf16": "BF16 autocast + fused AdamW"}  # benchmarks.compile_time --library, in table order
TARGET_COMPILE_X = 1.2  # fp8coat's 32-layer compiled model: first step done within this × torchao's time
TARGET_EAGER_FIRST_STEP_S = 10.0  # fp8coat's 32-layer eager model: the first step alone (compile_time's check)
TARGET_COMPILE_LAYERS = 32


def _compile_rows(run: Run) -> dict:
    """``{(library, recipe, compiled, layers, batch, seq): row}`` of a ``benchmarks.compile_time`` result (files
    from before ``--library`` and ``--eager`` are fp8coat, compiled)."""
    rows = {}
    for i, row in enumerate(_entries(run, "rows")):
        where = f"rows[{i}]"
        library, compiled = row.get("library", "fp8coat"), row.get("compiled", True)
        if library not in COMPILE_LIBRARIES:
            raise run.fail(f"{where}: 'library' is {library!r}, expected one of {sorted(COMPILE_LIBRARIES)}")
        if not isinstance(compiled, bool):
            raise run.fail(f"{where}: 'compiled' is {compiled!r}, expected true or false")
        _num(run, row, "first_step_s", where)
        for key in ("two_steps_s", "build_s", "step1_s", "later_step_ms", "graphs"):
            _num(run, row, key, where, required=False)
        key = (library, str(row.get("recipe") or library), compiled, _int(run, row, "layers", where),
               _int(run, row, "batch", where), _int(run, row, "seq", where))
        rows[key] = row
    return rows


def compile_time_table(runs: list[Run]) -> list[str]:
    """Compile time (``benchmarks.compile_time``): build → first and second step done per library, compiled or
    eager, and depth; the first against torchao's compiled model of the same shape on the same GPU model (another
    process: the newest torchao file of that GPU)."""
    if not runs:
        return _no_result("compile_time")

    def anchor_of(run: Run, key: tuple) -> tuple[Run | None, float | None]:
        shape = key[3:]
        for other in reversed(runs):
            same_gpu = other is run or (run.meta.get("gpu") and other.meta.get("gpu") == run.meta.get("gpu"))
            for (library, _, compiled, *other_shape), row in (_compile_rows(other) if same_gpu else {}).items():
                if library == "torchao" and compiled and tuple(other_shape) == shape:
                    return other, row["first_step_s"]
        return None, None

    order = list(COMPILE_LIBRARIES)
    found = sorted(latest(runs, _compile_rows).items(),
                   key=lambda kv: (order.index(kv[0][0]), kv[0][1], not kv[0][2], *kv[0][3:]))
    rows, used, anchors, checks = [], [], [], []
    for key, (run, row, _) in found:
        library, recipe, compiled, layers, batch, seq = key
        first, step1 = row["first_step_s"], row.get("step1_s")
        anchor_run, anchor = anchor_of(run, key)
        label = COMPILE_LIBRARIES[library] + (f" `{recipe}`" if library == "fp8coat" else "")
        rows.append([label, "compiled" if compiled else "eager", str(layers), f"{batch} × {seq}", f"{first:.1f}",
                     _f(row.get("two_steps_s"), ".1f"), _f(row.get("build_s"), ".1f"), _f(step1, ".1f"),
                     _f(row.get("graphs"), ".0f"), _f(row.get("later_step_ms"), ".1f"), _f(anchor, ".1f"),
                     _x(first, anchor), *run.cells()])
        used.append(run)
        if anchor_run is not None and anchor_run is not run and anchor_run not in anchors:
            anchors.append(anchor_run)
        if library == "fp8coat" and layers == TARGET_COMPILE_LAYERS:
            where = f"`{recipe}` {'compiled' if compiled else 'eager'}, {layers} layers"
            if compiled:
                verdict = (f"{first / anchor:.2f}× torchao {'met' if first <= TARGET_COMPILE_X * anchor else 'MISSED'}"
                           if anchor else f"{first:.1f} s, no torchao anchor on this GPU model")
            else:
                verdict = ("first step not recorded" if step1 is None else
                           f"first step {step1:.1f} s {'met' if step1 <= TARGET_EAGER_FIRST_STEP_S else 'MISSED'}")
            checks.append(f"{where}: {verdict}")
    header = ["library", "mode", "layers", "batch × seq", "first step done s", "second step done s", "build s",
              "first step alone s", "graphs", "later step ms", "anchor: torchao compiled, first step done s (same "
              "GPU model)", "× anchor (time / anchor time)", *PROVENANCE]
    lines = _table(header, rows)
    lines += ["", "Seconds from the start of the build; the anchor is torchao's compiled model of the same depth, "
              "batch and seq in the newest torchao file of the same GPU model (a separate process)"
              + (": " + ", ".join(f"`{r.name}`" for r in anchors) if anchors else "") + "."]
    lines += ["", f"Targets: fp8coat's {TARGET_COMPILE_LAYERS}-layer compiled model's first step done within "
              f"{TARGET_COMPILE_X}× torchao's; its eager first step ≤ {TARGET_EAGER_FIRST_STEP_S:.0f} s: "
              + ("; ".join(checks) if checks else f"not measured (no fp8coat {TARGET_COMPILE_LAYERS}-layer row)")
              + "."]
    return lines + _commands(used + anchors)


TARGET_VLM_GAP_PCT = 0.5  # coat's val-loss gap to BF16 on the VLMs: within max(this, one BF16 std in %)
TARGET_VLM_SAVED_X = 0.45  # bytes saved for backward by the vision tower and by the LM, each, over BF16's
VLM_NUMBERS = ("val_loss_mean", "val_loss_std", "caption_exact_match", "tok_per_s", "peak_mem_gib",
               "saved_vision_bytes", "saved_lm_bytes")


def _vlm_models(run: Run) -> dict:
    """``{model: {"rows": [...], "problems": [...]}}`` of a ``benchmarks.vlm_compare`` result; each model's first
    row is its baseline (BF16)."""
    models = _rows(run, "results")
    for model, entry in models.items():
        where = f"results.{model}"
        if not isinstance(entry, dict) or not isinstance(entry.get("rows"), list):
            raise run.fail(f"{where}: expected an object with a \"rows\" list")
        if not isinstance(entry.get("problems", []), list):
            raise run.fail(f"{where}.problems: expected a list")
        for i, row in enumerate(entry["rows"]):
            row_where = f"{where}.rows[{i}]"
            if not isinstance(row, dict) or not isinstance(row.get("variant"), str):
                raise run.fail(f"{row_where}: expected an object with a \"variant\" name")
            for key in VLM_NUMBERS:
                _num(run, row, key, row_where, required=False)
            for key in ("seeds", "val_gap_pct"):
                values = row.get(key, [])
                if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                       for v in values):
                    raise run.fail(f"{row_where}: {key!r} is {values!r}, expected a list of numbers")
    return models


def _vlm_rows(run: Run) -> dict:
    return {(model, row["variant"]): row for model, entry in _vlm_models(run).items() for row in entry["rows"]}


def vlm_table(runs: list[Run]) -> list[str]:
    """BF16 against coat on VLMs (``benchmarks.vlm_compare``): validation loss over seeds, its gap per seed, the
    caption exact match, and speed, peak memory and saved bytes of a run alone, against the baseline of the same
    file and model. The targets are checked for the ``coat`` variants; other variants (e.g. ``fp8-linear-torchopt``,
    which tells FP8 GEMMs from FP8-saved activations) are reference rows."""
    runs = [r for r in runs if r.path.name.startswith("vlm_compare")]  # not the per-model compare reports
    if not runs:
        return _no_result("vlm")
    rows, used, checks, references, shown = [], [], [], [], set()
    for (model, variant), (run, row, _) in latest(runs, _vlm_rows).items():
        base = _vlm_models(run)[model]["rows"][0]
        is_base = row is base
        mean, std = row.get("val_loss_mean"), row.get("val_loss_std")
        b_mean, b_std = base.get("val_loss_mean"), base.get("val_loss_std")
        target = max(TARGET_VLM_GAP_PCT, 100 * b_std / b_mean) if b_mean and b_std is not None else None
        gaps = row.get("val_gap_pct") or []
        gap = statistics.fmean(gaps) if gaps and not is_base else None
        has_target = variant.split("-")[0] == "coat"  # the targets are coat's; other rows are references
        within = None if gap is None or target is None or not has_target else abs(gap) <= target

        def ratio(key: str, spec: str = ".2f", row=row, base=base) -> str:
            return _x(row.get(key), base.get(key) or None, spec=spec)  # a zero baseline is no anchor

        loss = "–" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
        rows.append([model, f"`{variant}`" + (" (baseline)" if is_base else ""), str(len(row.get("seeds") or [])),
                     loss, "–" if gap is None else f"{gap:+.2f}% ({', '.join(f'{g:+.2f}' for g in gaps)})",
                     _f(target, ".2f") + ("%" if target is not None else ""),
                     "–" if within is None else ("yes" if within else "no"),
                     _f(row.get("caption_exact_match"), ".3f"), _f(row.get("tok_per_s"), ",.0f"), ratio("tok_per_s"),
                     _f(row.get("peak_mem_gib"), ".2f"), ratio("peak_mem_gib"), ratio("saved_vision_bytes", ".3f"),
                     ratio("saved_lm_bytes", ".3f"), *run.cells()])
        used.append(run)
        shown.add((id(run), model))
        if not is_base and not has_target:
            references.append(f"{model} `{variant}`")
        elif not is_base:
            parts = [f"gap {'not measured' if gap is None else f'{gap:+.2f}%'} "
                     f"{'met' if within else 'MISSED'}" + (f" (bound {target:.2f}%)" if target is not None else "")]
            for key, what in (("saved_vision_bytes", "vision"), ("saved_lm_bytes", "LM")):
                value, anchor = row.get(key), base.get(key)
                x = value / anchor if value is not None and anchor else None
                parts.append(f"{what} " + ("not measured" if x is None else f"{x:.3f}×")
                             + f" {'met' if x is not None and x <= TARGET_VLM_SAVED_X else 'MISSED'}")
            checks.append(f"{model} `{variant}`: " + ", ".join(parts))
    header = ["model", "variant", "seeds", "val loss (mean ± std)", "val gap % mean (per seed)", "target",
              "within target", "caption exact match", "tok/s", "× baseline (same run)", "peak GiB", "× baseline",
              "saved vision ×", "saved LM ×", *PROVENANCE]
    lines = _table(header, rows)
    # the problems of the (file, model) pairs the table shows, and all of the newest file's
    sources = sorted({id(r): r for r in [*used, runs[-1]]}.values(), key=lambda r: r.key)
    problems = [f"`{run.name}`, {model}: {problem}" for run in sources
                for model, entry in _vlm_models(run).items() for problem in entry.get("problems", [])
                if (id(run), model) in shown or run is runs[-1]]
    if problems:
        lines += ["", "Problems the runs reported: " + "; ".join(problems) + "."]
    lines += ["", f"Targets: val gap within max({TARGET_VLM_GAP_PCT}%, one BF16 std); bytes saved for backward by "
              f"the vision tower and by the LM each ≤ {TARGET_VLM_SAVED_X}× BF16: "
              + ("; ".join(checks) if checks else "not measured (no coat variant beside the baseline)") + "."]
    if references:
        lines += ["", "Reference rows (the targets are coat's, not theirs): " + ", ".join(references) + "."]
    return lines + _commands(used)


TABLES = {  # table name: (folder under docs/results, builder)
    "optimizer": ("optimizer", optimizer_table),
    "linear": ("layers", linear_table),
    "layer": ("layers", layer_table),
    "model4": ("layers", model4_table),
    "accuracy": ("accuracy", accuracy_table),
    "cpu_compare": ("cpu_compare", cpu_compare_table),
    "llama7b": ("llama7b", llama7b_table),
    "compile_time": ("compile_time", compile_time_table),
    "vlm": ("vlm", vlm_table),
}


def generate(results: Path = RESULTS) -> dict[str, str]:
    """``{table name: markdown}`` for every table, from the folders under ``results``."""
    cache: dict[str, list[Run]] = {}
    out = {}
    for name, (folder, build) in TABLES.items():
        if folder not in cache:
            cache[folder] = load_runs(results / folder)
        out[name] = "\n".join(build(cache[folder]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the document


def begin_marker(name: str) -> str:
    return f"<!-- report:{name} begin (generated by `python -m benchmarks.report`; do not edit) -->"


def end_marker(name: str) -> str:
    return f"<!-- report:{name} end -->"


def fill(doc: str, tables: dict[str, str], where: str = "the document") -> str:
    """``doc`` with the text between each table's markers replaced by the table; ReportError naming ``where``
    when a table's markers are missing or out of order."""
    for name, text in tables.items():
        begin, end = begin_marker(name), end_marker(name)
        i, j = doc.find(begin), doc.find(end)
        if i < 0 or j < 0 or j < i:
            raise ReportError(f"{where}: no '{begin}' ... '{end}' block for the {name} table")
        doc = doc[: i + len(begin)] + "\n" + text + "\n" + doc[j:]
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the per-benchmark result folders")
    ap.add_argument("--doc", type=Path, default=DOC, help="the document whose generated parts are rewritten")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the document is not up to date")
    mode.add_argument("--print", action="store_true", help="print the generated parts instead of writing")
    args = ap.parse_args(argv)
    try:
        tables = generate(args.results)
        if args.print:
            for name, text in tables.items():
                print(f"## {name}\n\n{text}\n")
            return 0
        old = args.doc.read_text()
        new = fill(old, tables, str(args.doc))
    except ReportError as ex:
        print(f"benchmarks.report: {ex}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"{args.doc} is not up to date: run python -m benchmarks.report", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.doc.write_text(new)
        print(f"wrote {args.doc}")
    else:
        print(f"{args.doc} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
