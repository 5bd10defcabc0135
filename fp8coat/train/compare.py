"""``fp8coat compare``: several recipes on identical data order and seed; a loss-curve PNG and a summary table.

A variant is a recipe name (``bf16``, ``fp8-linear``, ``coat``) optionally followed by modifiers:
``-noexp`` (optimizer states without dynamic range expansion), ``-torchopt`` (``torch.optim.AdamW`` with fp32
params and states instead of ``fp8coat.AdamW``), ``-torchaofp8`` (torchao's ``AdamWFp8`` with fp32 params, if
torchao is installed: FP8 states in blocks of 256 of the flattened tensor, no expansion), ``-fp32master`` (fp32
params). With several seeds every variant
runs once per seed and the table reports mean ± standard deviation.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import replace

from ..recipe import RECIPES
from .config import TrainConfig
from .loop import train
from .progress import MetricsLog

__all__ = ["compare", "variant_config"]

_MODIFIERS = {"noexp": {"expansion": False}, "torchopt": {"optimizer": "torch"},
              "torchaofp8": {"optimizer": "torchao-fp8"}, "fp32master": {"master_weights": "fp32"}}


def variant_config(base: TrainConfig, variant: str, seed: int, out_dir: str) -> TrainConfig:
    recipe = next((r for r in sorted(RECIPES, key=len, reverse=True)
                   if variant == r or variant.startswith(r + "-")), None)
    if recipe is None:
        raise ValueError(f"unknown variant {variant!r}: expected a recipe ({', '.join(RECIPES)}) optionally "
                         f"followed by -{', -'.join(_MODIFIERS)}")
    mods = [m for m in variant[len(recipe):].split("-") if m]
    changes = {"recipe": recipe, "seed": seed, "out_dir": os.path.join(out_dir, f"{variant}_seed{seed}")}
    for mod in mods:
        if mod not in _MODIFIERS:
            raise ValueError(f"unknown variant modifier {mod!r} in {variant!r}; known: {sorted(_MODIFIERS)}")
        changes.update(_MODIFIERS[mod])
    return replace(base, **changes).validate()


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(base: TrainConfig, variants: "list[str]", seeds: "list[int]", out_dir: str) -> dict:
    """Train every variant × seed; write ``compare.md``, ``compare.json`` and ``loss.png`` to ``out_dir``."""
    configs = {(v, s): variant_config(base, v, s, out_dir) for v in variants for s in seeds}  # validate all first
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for (variant, seed), cfg in configs.items():
        summary = train(cfg, label=f"{variant} seed {seed}")
        summary["history"] = MetricsLog.read(os.path.join(cfg.out_dir, "metrics.jsonl"))
        results[variant].append(summary)
    table = _table(results, seeds)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"config": base.to_dict(), "variants": variants, "seeds": seeds, "results": results}, f, indent=1)
    _plot(results, os.path.join(out_dir, "loss.png"))
    print(table)
    return results


def _table(results: dict, seeds: "list[int]") -> str:
    """Markdown summary; gaps are relative to the first variant named ``bf16...`` (the BF16 reference)."""
    ref_name = next((v for v in results if v.startswith("bf16")), None)
    ref = results.get(ref_name) if ref_name else None
    ref_val = _mean_std([r["final_val_loss"] for r in ref])[0] if ref else None
    ref_train = _mean_std([r["final_train_loss"] for r in ref])[0] if ref else None
    cuda = any("peak_mem_gib" in r for rs in results.values() for r in rs)
    mem_cols = "peak GPU memory |" if cuda else "optimizer state | saved for backward by the decoder (1 micro-batch) |"
    lines = [f"| variant | final train loss | final val loss | val gap vs bf16 | train gap vs bf16 | tok/s | {mem_cols}",
             "|---|---|---|---|---|---|" + ("---|" if cuda else "---|---|")]

    def fmt(ms, digits=4):
        m, s = ms
        if m is None:
            return "–"
        return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(seeds) > 1 else "")

    for variant, runs in results.items():
        tr = _mean_std([r["final_train_loss"] for r in runs])
        va = _mean_std([r["final_val_loss"] for r in runs])
        gap_v = f"{100 * (va[0] / ref_val - 1):+.2f}%" if ref_val and va[0] is not None else "–"
        gap_t = f"{100 * (tr[0] / ref_train - 1):+.2f}%" if ref_train and tr[0] is not None else "–"
        speed = _mean_std([r["tok_per_s"] for r in runs])[0]
        speed = f"{speed:,.0f}" if speed else "–"
        if cuda:
            mem = f"{max(r.get('peak_mem_gib', 0) for r in runs):.2f} GiB |"
        else:
            mem = (f"{runs[0]['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                   f"{runs[0].get('saved_activation_bytes', 0) / 2**20:.2f} MiB |")
        lines.append(f"| {variant} | {fmt(tr)} | {fmt(va)} | {gap_v} | {gap_t} | {speed} | {mem}")
    return "\n".join(lines)


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot")
        return
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (variant, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, run in enumerate(runs):
            hist = run["history"]
            ax_t.plot([r["step"] for r in hist], [r["loss"] for r in hist], color=color, alpha=0.8,
                      lw=1, label=variant if j == 0 else None)
            val = [r for r in hist if "val_loss" in r]
            ax_v.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=color, alpha=0.8,
                      label=variant if j == 0 else None)
    for ax, title in ((ax_t, "train loss"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
