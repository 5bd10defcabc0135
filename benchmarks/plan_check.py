"""The memory planner against measured peaks: prints planner vs measured per result row, flagging rows off by more
than ±10%.

Reads result JSONs (default: ``docs/results/layers/*.json`` and ``docs/results/llama7b/*.json``):

* ``bench_layers`` files: ``rows.model4`` (a Llama-7B-shaped model of ``config.layers`` layers, ``peak_GiB``: the
  training step's peak above the memory held before the model was built) and ``rows.layer`` (one decoder layer:
  ``peak_fwd_bwd_GiB`` and ``mem_fwd_GiB`` above the memory held before the forward, which already held the
  layer's parameters, its FP8 weight copies if cached, input and output gradient). Settings come from the row
  (recipe from the key, ``param_dtype``, ``amp``, ``chunked_loss``, ``step_in_backward``, ``compiled``,
  ``cache_fp8_weights``; ``stochastic`` in the key = ``bf16-stochastic`` masters). torchao float8 rows are skipped
  (not modeled).
* rows of the shape ``{recipe, optimizer, master_weights, step_in_backward, chunked_loss, compiled, batch, seq,
  layers, peak_gib[, cache_fp8_weights, allocated_before_gib, oom, vocab, hidden, heads, kv_heads, intermediate]}``
  (a list, or under ``rows``): a Llama-2-7B shape unless given; ``allocated_before_gib`` (left by earlier runs of the
  same process) is taken off the peak; out-of-memory rows are listed with the plan only.

``cache_fp8_weights`` is the value the row ran with (``benchmarks.llama7b`` and ``bench_layers`` record the recipe's
own); missing or None, the FP8 weight copies are planned as held: rows without it come from runs before the cache
was off by default (or from an fp8coat without the option), when converted linears always kept them.

Usage: ``python -m benchmarks.plan_check [files...]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys

from fp8coat.memory import ModelShape, PlanSettings, plan_memory
from fp8coat.memory.layer_saved import layer_saved_bytes
from fp8coat.memory.plan import GIB
from fp8coat.memory.transient import layer_backward_workspace

TOLERANCE = 0.10
DEFAULT_GLOBS = ("docs/results/layers/*.json", "docs/results/llama7b/*.json")


def _shape(cfg: dict, layers: int) -> ModelShape:
    hidden = cfg.get("hidden", 4096)
    heads = cfg.get("heads", 32)
    return ModelShape("llama", hidden=hidden, layers=layers, heads=heads, kv_heads=cfg.get("kv_heads", heads),
                      head_dim=hidden // heads, intermediate=cfg.get("ffn", cfg.get("intermediate", 11008)),
                      vocab=cfg.get("vocab", 32000))


def _model4_settings(key: str, row: dict, cfg: dict) -> "PlanSettings | None":
    if key.startswith("torchao") or "recipe" in row and row["recipe"].startswith("torchao"):
        return None
    recipe = "bf16" if key.startswith("bf16") else next(r for r in ("fp8-linear", "coat") if r in key)
    optimizer = {"AdamW": "fp8coat" if row.get("param_dtype") == "bfloat16" else "torch",
                 "AdamWFp8": "torchao-fp8"}.get(row.get("optimizer"), "torch")
    master = "bf16-stochastic" if "stochastic" in key else "auto"
    return PlanSettings(batch=cfg["batch"], seq=cfg["seq"], recipe=recipe, optimizer=optimizer,
                        master_weights=master, step_in_backward=bool(row.get("step_in_backward")),
                        chunked_loss=bool(row.get("chunked_loss")), loss_chunk_tokens=row.get("loss_chunk"),
                        compiled=bool(row.get("compiled")), cache_fp8_weights=_cached(row))


def _cached(row: dict) -> bool:
    """Whether the row's converted linears kept FP8 weight copies: its recorded ``cache_fp8_weights``, else on (the
    only behaviour before the option was off by default)."""
    return row.get("cache_fp8_weights") is not False


def _layer_predictions(shape: ModelShape, key: str, row: dict, cfg: dict) -> "dict[str, float] | None":
    """One decoder layer (bf16 parameters, no autocast): memory after the forward (saved tensors; RoPE's cos/sin
    and the layer's input excluded: made before) and the fwd+bwd peak (+ its backward workspace, which holds the
    layer's gradients), in GiB."""
    if key.startswith("torchao"):
        return None
    recipe, compiled = row["recipe"], bool(row.get("compiled"))
    b, s = cfg["batch"], cfg["seq"]
    saved = sum(layer_saved_bytes(shape, recipe, b, s, compiled=compiled).values())
    if compiled and recipe == "bf16":
        saved -= b * s * shape.hidden * 2  # the compiled layer keeps its input, allocated before the forward
    # the workspace counts the incoming gradient, which the benchmark allocated before its baseline
    workspace = layer_backward_workspace(shape, recipe, b, s, compiled=compiled) - b * s * shape.hidden * 2
    return {"mem_fwd_GiB": saved / GIB, "peak_fwd_bwd_GiB": (saved + workspace) / GIB}


def _rows_of(path: str):
    """(label, shape, settings or None, measured GiB or None, note) for every row of one file."""
    with open(path) as f:
        data = json.load(f)
    name = path.split("/")[-1]
    if isinstance(data, dict) and isinstance(data.get("rows"), dict) and "model4" in data["rows"]:
        cfg = data["config"]
        for key, row in data["rows"].get("model4", {}).items():
            settings = _model4_settings(key, row, cfg)
            if settings is None:
                continue
            yield (f"{name} model4/{key}", _shape(cfg, cfg["layers"]), settings, row.get("peak_GiB"),
                   "oom" if row.get("oom") else "")
        for key, row in data["rows"].get("layer", {}).items():
            if row.get("oom"):
                continue
            pred = _layer_predictions(_shape(cfg, 1), key, row, cfg)
            if pred is None:
                continue
            for metric, value in pred.items():
                if row.get(metric) is not None:
                    yield (f"{name} layer/{key} {metric}", None, value, row[metric], "")
        return
    rows = data.get("rows", data) if isinstance(data, dict) else data
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        if str(row.get("recipe", "")).startswith("torchao"):  # torchao float8: not modeled
            continue
        shape = ModelShape("llama", hidden=row.get("hidden", 4096), layers=row.get("layers", 32),
                           heads=row.get("heads", 32), kv_heads=row.get("kv_heads", row.get("heads", 32)),
                           head_dim=row.get("hidden", 4096) // row.get("heads", 32),
                           intermediate=row.get("intermediate", 11008), vocab=row.get("vocab", 32000))
        settings = PlanSettings(batch=row["batch"], seq=row["seq"], recipe=row["recipe"],
                                optimizer=row.get("optimizer", "fp8coat"),
                                master_weights=row.get("master_weights", "auto"),
                                step_in_backward=bool(row.get("step_in_backward")),
                                chunked_loss=bool(row.get("chunked_loss", True)), compiled=bool(row.get("compiled")),
                                cache_fp8_weights=_cached(row))
        label = f"{name} #{i} {row.get('row', row['recipe'])}/{settings.optimizer} b{row['batch']}"
        peak = None if row.get("oom") or row.get("peak_gib") is None else row["peak_gib"] - (
            row.get("allocated_before_gib") or 0.0)  # what the run itself allocated
        yield label, shape, settings, peak, "oom" if row.get("oom") else ""


def check(paths: "list[str]") -> "tuple[str, int]":
    """The comparison table (markdown) and the number of rows outside ±10%."""
    lines = ["| row | planned GiB | measured GiB | planned / measured | |", "|---|---|---|---|---|"]
    off = 0
    seen = set()
    for path in paths:
        for label, shape, settings, measured, note in _rows_of(path):
            planned = plan_memory(shape, settings).peak / GIB if shape is not None else settings
            key = (label.split(" ", 1)[1], round(planned, 6), None if measured is None else round(measured, 3))
            if key in seen:  # the same variant measured identically in another file of the same run
                continue
            seen.add(key)
            if measured is None:
                lines.append(f"| {label} | {planned:.2f} | {note or '-'} | - | |")
                continue
            ratio = planned / measured
            flag = "" if abs(ratio - 1) <= TOLERANCE else "**off by more than 10%**"
            off += bool(flag)
            lines.append(f"| {label} | {planned:.3f} | {measured:.3f} | {ratio:.3f} | {flag} |")
    return "\n".join(lines), off


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help=f"result JSONs (default: {', '.join(DEFAULT_GLOBS)})")
    args = ap.parse_args(argv)
    paths = args.files or sorted(p for g in DEFAULT_GLOBS for p in glob.glob(g))
    paths = [p for p in paths if not p.endswith("runs.json")]
    if not paths:
        print("no result files", file=sys.stderr)
        return 1
    table, off = check(paths)
    print(table)
    print(f"\n{off} row(s) outside ±{TOLERANCE:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


