"""``fp8coat compare``: several recipes on identical data order and seed; a loss-curve PNG and a summary table.

A variant is a recipe name (``bf16``, ``fp8-linear``, ``coat``) optionally followed by modifiers: ``-noexp``
(optimizer states without dynamic range expansion), ``-torchopt`` (``torch.optim.AdamW`` with fp32 params and states
instead of ``fp8coat.AdamW``), ``-torchaofp8`` (torchao's ``AdamWFp8`` with fp32 params, if torchao is installed:
FP8 states in blocks of 256 of the flattened tensor, no expansion), ``-fp32master`` (fp32 params), ``-fp8attn``
(``coat`` only: the attention core saves FP8 q, k, v, as ``--fp8-attention``, so that ``coat`` and ``coat-fp8attn``
can run side by side). The default, :data:`DEFAULT_VARIANTS`, is the usual BF16 baseline (``bf16-torchopt``: BF16
autocast, torch's AdamW with fp32 params and states) against fp8coat (``coat``: FP8 linear layers and FP8-saved
activations, ``fp8coat.AdamW`` with FP8 states). The other options apply to every variant, except
``--cache-fp8-weights``, which only the FP8 variants take (a ``bf16`` variant has no FP8 weights to keep), and
``--fp8-attention``, which only the ``coat`` variants take (an option of that recipe).

Gaps and memory ratios are relative to the baseline row: the first variant with recipe ``bf16`` and torch's
AdamW, else the first ``bf16`` variant, else the first variant. With several seeds every variant runs once per
seed; the table reports mean ± standard deviation and the plot the mean with the min–max band over seeds.
Runs go seed by seed (every variant for the first seed, then for the next); ``compare.md``, ``compare.json``
and ``loss.png`` are rewritten after every run, so an interrupted compare keeps the runs it finished.
Each run has its own folder, ``<out_dir>/<variant>_seed<seed>``; running compare again replaces those runs, and
removes the report files of the earlier compare before its first run starts.

A run that diverges (``train`` raises :class:`~fp8coat.train.finite.NonFiniteError`) is recorded as diverged and
the compare goes on with the next run. Its record holds ``seed``, ``recipe``, ``optimizer``, ``history`` (its
metrics log so far) and ``diverged`` (the error message), and no final losses. Its row in the table says where
it diverged; means, standard deviations and gaps use only the runs that finished, and a seed whose baseline run
diverged has no gaps. The plot draws each diverged run's history as a line of its own. ``fp8coat compare`` exits
with status 1 after such a compare, naming the diverged runs (:func:`diverged_message`).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from dataclasses import replace

from ..recipe import RECIPES
from .config import TrainConfig
from .data._atomic import atomic_file, atomic_write_text
from .distributed import launch_world
from .finite import NonFiniteError
from .loop import FINAL_WINDOW, train
from .progress import MetricsLog, human_bytes

__all__ = ["DEFAULT_VARIANTS", "compare", "describe", "diverged_message", "merge_records", "variant_config",
           "write_reports"]

DEFAULT_VARIANTS = ("bf16-torchopt", "coat")
REPORT_FILES = ("compare.md", "compare.json", "loss.png")

_MODIFIERS = {"noexp": {"expansion": False}, "torchopt": {"optimizer": "torch"},
              "torchaofp8": {"optimizer": "torchao-fp8"}, "fp32master": {"master_weights": "fp32"},
              "fp8attn": {"fp8_attention": True}}

_OPTIMIZER_NAMES = {"torch": "torch AdamW", "fp8coat": "fp8coat AdamW", "torchao-fp8": "torchao AdamWFp8"}

_RECIPE_NOTES = {
    "bf16": "the model unchanged (BF16 GEMMs, activations saved as the original model saves them)",
    "fp8-linear": "FP8 linear layers (E4M3 forward, E5M2 gradients) that save FP8 inputs",
    "coat": "FP8 linear layers plus FP8-saved inputs of norms and activation functions (COAT); with \"FP8 "
            "attention\" (`--fp8-attention`) also FP8-saved q, k, v of the attention core, recomputed in backward",
}
_OPTIMIZER_NOTES = {
    "torch": "`torch.optim.AdamW`: fp32 params and fp32 moments, 12 B/param with the params (with the `bf16` "
             "recipe the model runs under BF16 autocast)",
    "fp8coat": "`fp8coat.AdamW`: FP8 moments with dynamic range expansion (unless the row says \"no expansion\"; "
               "1-D tensors and tensors under 4096 elements keep fp32 moments) and bf16 params made exact fp32 "
               "masters by 16-bit remainders (unless the row says otherwise): ≈ 6.1 B/param with the params",
    "torchao-fp8": "torchao's `AdamWFp8`: fp32 params, FP8 moments in blocks of 256 (no expansion); with the "
                   "`bf16` recipe the model runs under BF16 autocast",
}


def variant_config(base: TrainConfig, variant: str, seed: int, out_dir: str) -> TrainConfig:
    recipe = next((r for r in sorted(RECIPES, key=len, reverse=True)
                   if variant == r or variant.startswith(r + "-")), None)
    if recipe is None:
        raise ValueError(f"unknown variant {variant!r}: expected a recipe ({', '.join(RECIPES)}) optionally "
                         f"followed by -{', -'.join(_MODIFIERS)}")
    mods = [m for m in variant[len(recipe):].split("-") if m]
    changes = {"recipe": recipe, "seed": seed, "out_dir": os.path.join(out_dir, f"{variant}_seed{seed}")}
    if recipe == "bf16":  # --cache-fp8-weights is for the FP8 variants; a BF16 model has no FP8 weights
        changes["cache_fp8_weights"] = False
    if recipe != "coat":  # --fp8-attention is an option of the coat recipe
        changes["fp8_attention"] = False
    for mod in mods:
        if mod not in _MODIFIERS:
            raise ValueError(f"unknown variant modifier {mod!r} in {variant!r}; known: {sorted(_MODIFIERS)}")
        changes.update(_MODIFIERS[mod])
    return replace(base, **changes).validate()


def describe(cfg: TrainConfig) -> str:
    """A row name for a run: ``"<recipe> + <optimizer>"`` with its optimizer options in parentheses, e.g.
    ``"bf16 + torch AdamW"``, ``"coat + fp8coat AdamW"``, ``"coat + fp8coat AdamW (no expansion)"``,
    ``"coat (FP8 attention) + fp8coat AdamW"``."""
    options = []
    if cfg.optimizer == "fp8coat":
        if not cfg.expansion:
            options.append("no expansion")
        if cfg.master_weights == "fp32":
            options.append("fp32 params")
        elif cfg.master_weights == "bf16-stochastic":
            options.append("no master, stochastic rounding")
        elif cfg.master_weights == "none":
            options.append("no master, round to nearest")
    recipe = cfg.recipe + (" (FP8 attention)" if cfg.fp8_attention else "")
    name = f"{recipe} + {_OPTIMIZER_NAMES.get(cfg.optimizer, cfg.optimizer)}"
    return name + (f" ({', '.join(options)})" if options else "")


def _baseline(configs: dict[str, TrainConfig]) -> str | None:
    """The first ``bf16`` variant with torch's AdamW, else the first ``bf16`` variant, else the first variant."""
    for accept in (lambda c: c.recipe == "bf16" and c.optimizer == "torch", lambda c: c.recipe == "bf16",
                   lambda c: True):
        found = next((v for v, c in configs.items() if accept(c)), None)
        if found is not None:
            return found
    return None


def _check_unique(items, what: str) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{what}: {item!r} is listed twice")
        seen.add(item)


def compare(base: TrainConfig, variants: list[str], seeds: list[int], out_dir: str) -> dict:
    """Train every variant × seed; write ``compare.md``, ``compare.json`` and ``loss.png`` to ``out_dir`` after
    each run (those of an earlier compare are removed before the first run starts). All variants are validated
    before the first run starts. A run that raises :class:`~fp8coat.train.finite.NonFiniteError` is recorded as
    diverged and the compare goes on (see :func:`diverged_message`). Returns ``{variant: [record per seed]}``;
    the record of a finished run is :func:`fp8coat.train.train`'s summary plus ``seed`` and ``history`` (the
    metrics log), that of a diverged run is ``seed``, ``recipe``, ``optimizer``, ``history`` (the metrics log
    so far, possibly empty) and ``diverged`` (the error message)."""
    if launch_world()[1] > 1:
        raise ValueError("fp8coat compare runs in one process: start it without torchrun (for a sharded run, "
                         "launch fp8coat train with torchrun)")
    if not variants:
        raise ValueError("--variants: name at least one variant")
    if not seeds:
        raise ValueError("--seeds: name at least one seed")
    _check_unique(variants, "--variants")
    _check_unique(seeds, "--seeds")
    # seed-major order: an interrupted compare has every variant for its first seeds
    configs = {(v, s): variant_config(base, v, s, out_dir) for s in seeds for v in variants}  # validate all first
    first = {v: configs[(v, seeds[0])] for v in variants}
    labels = {v: describe(c) for v, c in first.items()}
    baseline = _baseline(first)
    os.makedirs(out_dir, exist_ok=True)
    _remove_reports(out_dir)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    document = ""
    for done, ((variant, seed), cfg) in enumerate(configs.items(), start=1):
        try:
            summary = train(cfg, overwrite=True, label=f"{labels[variant]} seed {seed}")  # a compare replaces its runs
        except KeyboardInterrupt:
            if done > 1:
                diverged = len(_diverged_runs(results))
                print(f"{done - 1 - diverged} of {len(configs)} runs finished"
                      + (f", {diverged} diverged" if diverged else "") + f": {os.path.join(out_dir, 'compare.md')}")
            raise
        except NonFiniteError as err:
            summary = {"recipe": cfg.recipe, "optimizer": cfg.optimizer, "diverged": str(err)}
            print(f"{labels[variant]} seed {seed} diverged: {err}"
                  + ("; going on with the next run" if done < len(configs) else ""), file=sys.stderr)
        summary["seed"] = seed
        metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
        summary["history"] = MetricsLog.read(metrics) if os.path.isfile(metrics) else []  # a diverged run: maybe none
        results[variant].append(summary)
        diverged = len(_diverged_runs(results))
        record = {"config": base.to_dict(), "variants": variants, "seeds": seeds, "baseline": baseline,
                  "labels": labels, "runs_finished": done - diverged, "runs_diverged": diverged,
                  "runs_total": len(configs), "results": results}
        document = write_reports(out_dir, record)
    print(document.split("\n**Columns**")[0].rstrip())
    print(f"(column meanings: {os.path.join(out_dir, 'compare.md')}; loss curves: "
          f"{os.path.join(out_dir, 'loss.png')})")
    return results


def diverged_message(results: dict, out_dir: str) -> str | None:
    """None if no run in ``results`` (:func:`compare`'s) diverged, else a message for the end of a compare: how
    many runs diverged, which (variant, seed and step) and where the report is, e.g. ``"1 of 4 runs diverged:
    coat seed 1 at step 37; ..."``."""
    diverged = _diverged_runs(results)
    if not diverged:
        return None
    total = sum(len(runs) for runs in results.values())
    how_many = f"all {total} runs" if len(diverged) == total else f"{len(diverged)} of {total} runs"
    names = ", ".join(f"{variant} seed {run.get('seed')}" + _stopped_at(run) for variant, run in diverged)
    return (f"{how_many} diverged: {names}; the report of every run, diverged ones included: "
            f"{os.path.join(out_dir, 'compare.md')}")


def write_reports(out_dir: str, record: dict, names: tuple[str, str, str] = REPORT_FILES) -> str:
    """Write a compare's report files into ``out_dir`` from its ``record`` (the content of ``compare.json``:
    ``config``, ``variants``, ``seeds``, ``baseline``, ``labels``, ``runs_finished``, ``runs_diverged``,
    ``runs_total``, ``results``); ``names`` are the file names of the table, the record and the loss plot.
    Returns the table's markdown."""
    base = TrainConfig.from_dict(record["config"])
    results, labels, seeds = record["results"], record["labels"], record["seeds"]
    document = report(results, labels, record["baseline"], base, seeds, runs_total=record["runs_total"])
    table, raw, plot = names
    atomic_write_text(os.path.join(out_dir, table), document)
    atomic_write_text(os.path.join(out_dir, raw), json.dumps(record, indent=1))
    _plot(results, labels, _title(results, base, seeds), os.path.join(out_dir, plot))
    return document


def merge_records(records: list[dict], variants: "list[str] | None" = None) -> dict:
    """One compare record (the content of ``compare.json``) from several of the same configuration, e.g. one per
    seed, per variant or per GPU call: each variant's runs joined and sorted by seed, labels and seeds united, the
    first record's config. ``variants``: their order, the first one the baseline (default: in order of
    appearance, the baseline the records name, else ``bf16-torchopt``, else ``bf16``, else the first)."""
    order = list(variants or [])
    results: dict[str, list] = {v: [] for v in order}
    labels: dict[str, str] = {}
    for rec in records:
        labels.update(rec.get("labels") or {})
        for variant, runs in rec["results"].items():
            results.setdefault(variant, []).extend(runs)
    for runs in results.values():
        runs.sort(key=lambda r: r.get("seed", 0))
    names = list(results)
    recorded = [rec["baseline"] for rec in records if rec.get("baseline")]
    baseline = order[0] if order else next((v for v in [*recorded, "bf16-torchopt", "bf16", *names] if v in names),
                                           None)
    return {"config": records[0].get("config"), "variants": names,
            "seeds": sorted({r.get("seed", 0) for runs in results.values() for r in runs}), "baseline": baseline,
            "labels": {v: labels.get(v, v) for v in names},
            "runs_finished": sum(not r.get("diverged") for runs in results.values() for r in runs),
            "runs_diverged": len(_diverged_runs(results)),
            "runs_total": sum(rec.get("runs_total", sum(map(len, rec["results"].values()))) for rec in records),
            "results": results}


def _remove_reports(out_dir: str) -> None:
    """Remove the report files of an earlier compare into ``out_dir``: they describe runs this one replaces."""
    for name in REPORT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def _diverged_runs(results: dict) -> list[tuple[str, dict]]:
    """``(variant, record)`` of every diverged run in ``results`` (``{variant: [record per seed]}``), in order."""
    return [(variant, run) for variant, runs in results.items() for run in runs if run.get("diverged")]


def _stopped_at(run: dict) -> str:
    """Where a diverged run stopped, for a sentence: ``" at step N"`` with the step its error message names (the
    first step whose loss or weights were not finite, or the last of a streak of non-finite gradient norms), else
    ``" after step N"`` with the last step in its history, else ``""``."""
    message = run.get("diverged") or ""
    streak = re.search(r"\((\d+) to (\d+)\)", message)
    at_step = re.search(r"at step (\d+)", message)
    if streak:
        return f" at step {streak.group(2)}"
    if at_step:
        return f" at step {at_step.group(1)}"
    steps = [r["step"] for r in run.get("history") or [] if "step" in r]
    return f" after step {steps[-1]}" if steps else ""


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _title(results: dict, base: TrainConfig, seeds: list[int]) -> str:
    params = next((r["params"] for runs in results.values() for r in runs if r.get("params")), None)
    tokens = base.batch_size * base.grad_accum * base.seq_len
    size = f" ({params / 1e6:.1f}M params)" if params else ""
    return (f"model {base.model}{size}, data {base.data}, {base.steps} steps × {tokens:,} tokens "
            f"= {base.steps * tokens:,} tokens, seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))}")


# (summary key, column header, bytes of a summary value, how to combine seeds)
_MEMORY_COLUMNS = (
    ("peak_mem_gib", "peak GPU memory", lambda v: v * 2**30, max),
    ("param_bytes", "weights", float, statistics.fmean),
    ("optimizer_state_bytes", "optimizer state", float, statistics.fmean),
    ("saved_activation_bytes", "saved for backward", float, statistics.fmean),
    ("saved_vision_bytes", "saved: vision", float, statistics.fmean),
    ("saved_lm_bytes", "saved: LM", float, statistics.fmean),
    ("fp8_weight_copy_bytes", "FP8 weight copies", float, statistics.fmean),
)


def report(results: dict, labels: dict[str, str], baseline: str | None, base: TrainConfig,
           seeds: list[int], runs_total: int | None = None) -> str:
    """``compare.md``: a title line, the table (one row per variant with finished or diverged runs; mean ± std
    over the seeds that finished; gaps and memory ratios relative to ``baseline``) and what each column means.
    A row with diverged runs says which seeds diverged at which step, and "–" where no run of it finished."""
    rows = {v: runs for v, runs in results.items() if runs}
    done = {v: [r for r in runs if not r.get("diverged")] for v, runs in rows.items()}  # the runs that finished
    diverged = _diverged_runs(rows)
    finished = sum(len(runs) for runs in done.values())
    any_run = [r for runs in done.values() for r in runs]
    window = min(FINAL_WINDOW, max((r["steps"] for r in any_run), default=FINAL_WINDOW))
    memory = [c for c in _MEMORY_COLUMNS if any(c[0] in r for r in any_run)]
    captions = any(r.get("caption_exact_match") is not None for r in any_run)  # vision-language models
    ref = done.get(baseline, [])  # the baseline's finished runs: a seed whose baseline run diverged has no gaps

    def mean(runs, key):
        return _mean_std([r.get(key) for r in runs])[0]

    def mem_value(runs, column):
        key, _, to_bytes, combine = column
        values = [to_bytes(r[key]) for r in runs if r.get(key) is not None]
        return combine(values) if values else None

    def loss(runs, key):
        m, s = _mean_std([r.get(key) for r in runs])
        if m is None:
            return "–"
        return f"{m:.4f}" + (f" ± {s:.4f}" if len(runs) > 1 else "")

    def gap(variant, key):
        """Per seed against the baseline's run of the same seed (same data order and validation split), then
        mean ± std over seeds; only seeds where both runs finished count (how many, when fewer than the row's
        runs)."""
        if variant == baseline:
            return "–"
        ref_by_seed = {r.get("seed"): r.get(key) for r in ref}
        gaps = [100 * (r[key] / ref_by_seed[r.get("seed")] - 1) for r in done[variant]
                if r.get(key) is not None and ref_by_seed.get(r.get("seed"))]
        if not gaps:
            return "–"
        m, s = _mean_std(gaps)
        count = f" ({len(gaps)} of {len(rows[variant])} seeds)" if len(gaps) < len(rows[variant]) else ""
        return f"{m:+.2f}%" + (f" ± {s:.2f}%" if len(gaps) > 1 else "") + count

    def run_name(variant):
        """The row's name: recipe + optimizer, and which of its runs diverged where."""
        name = labels[variant] + (" (baseline)" if variant == baseline else "")
        bad = [r for r in rows[variant] if r.get("diverged")]
        if not bad:
            return name
        if len(rows[variant]) == 1 and len(seeds) == 1:
            return f"{name}: diverged{_stopped_at(bad[0])}"
        where = ", ".join(f"seed {r.get('seed')}{_stopped_at(r)}" for r in bad)
        return f"{name}: {len(done[variant])} of {len(rows[variant])} seeds finished, diverged: {where}"

    header = ["run", "variant", f"train loss (last {window} steps)", "val loss", "val gap vs baseline",
              "train gap vs baseline", "tok/s"] + (["caption exact match"] if captions else []) + [c[1] for c in memory]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in rows:
        runs = done[variant]
        speed = mean(runs, "tok_per_s")
        cells = [run_name(variant), f"`{variant}`", loss(runs, "final_train_loss"), loss(runs, "final_val_loss"),
                 gap(variant, "final_val_loss"), gap(variant, "final_train_loss"), f"{speed:,.0f}" if speed else "–"]
        if captions:
            match = mean(runs, "caption_exact_match")
            cells.append("–" if match is None else f"{match:.1%}")
        for column in memory:
            value = mem_value(runs, column)
            ref_value = mem_value(ref, column) if ref else None
            cells.append("–" if value is None else human_bytes(value, digits=2) + (
                f" ({value / ref_value:.2f}x)" if ref_value else ""))
        lines.append("| " + " | ".join(cells) + " |")

    out = [f"# fp8coat compare: {_title(results, base, seeds)}", ""]
    total = runs_total if runs_total is not None else finished + len(diverged)
    if finished < total:
        status = f"{finished} of {total} runs finished"
        if diverged:
            status += f"; {len(diverged)} diverged: " + ", ".join(
                f"`{v}` seed {r.get('seed')}{_stopped_at(r)}" for v, r in diverged)
        out += [status + ".", ""]
    out += lines + [""]
    if baseline is not None:
        base_runs = rows.get(baseline, [])
        usual = not base_runs or (base_runs[0].get("recipe"), base_runs[0].get("optimizer")) == ("bf16", "torch")
        cfg_note = "" if usual else " (add `bf16-torchopt` to `--variants` for BF16 with torch's AdamW)"
        base_note = (f"Baseline: {labels[baseline]} (`{baseline}`){cfg_note}. Gaps and the ratios in parentheses "
                     "are relative to it.")
        base_diverged = [str(r.get("seed")) for r in base_runs if r.get("diverged")]
        if base_diverged and not ref:
            base_note += " It has no finished run (diverged): no gaps and no ratios."
        elif base_diverged:
            base_note += (f" Its run of seed{'s' if len(base_diverged) > 1 else ''} {', '.join(base_diverged)} "
                          "diverged: the gaps leave out that seed.")
        out += [base_note, ""]
    every_run = [r for runs in rows.values() for r in runs]  # diverged ones too: their rows are described
    recipes = [r for r in dict.fromkeys(run.get("recipe") for run in every_run) if r in _RECIPE_NOTES]  # row order
    optimizers = [o for o in dict.fromkeys(run.get("optimizer") for run in every_run) if o in _OPTIMIZER_NOTES]
    tokens = f"{base.batch_size} × {base.seq_len} tokens"
    notes = [
        "**run**: recipe + optimizer." + "".join(f"\n  - `{r}`: {_RECIPE_NOTES[r]}." for r in recipes) +
        "".join(f"\n  - {_OPTIMIZER_NAMES[o]}: {_OPTIMIZER_NOTES[o]}." for o in optimizers),
        "**variant**: the name to pass to `--variants`.",
        (f"**train loss (last {window} steps)**: mean training cross-entropy (nats/token) of the last {window} "
         "optimizer steps, on the training batches and with the recipe's FP8 quantization: an average over a model "
         "still changing, on other text than the val loss, so compare it between rows, not with the val loss."),
        (f"**val loss**: cross-entropy (nats/token) of the final model on {base.eval_batches} held-out validation "
         f"batches of {tokens}, in eval mode (unquantized forward)."),
        ("**val gap / train gap vs baseline**: 100 × (loss / loss of the baseline's run with the same seed − 1), "
         "the mean over seeds (± their standard deviation); negative: lower than the baseline."),
        "**tok/s**: median training throughput over the logged intervals (the first one excluded).",
    ]
    if captions:
        notes.append(f"**caption exact match**: share of the first {base.caption_eval} held-out records whose caption "
                     "(or first answer) the final model generates exactly (greedy, at most 16 new tokens, eval mode; "
                     "stripped), the mean over seeds.")
    memory_notes = {
        "peak_mem_gib": "**peak GPU memory**: the most GPU memory allocated at once during the run "
                        "(`torch.cuda.max_memory_allocated`: weights, gradients, optimizer state, activations).",
        "param_bytes": "**weights**: bytes of the model's parameters.",
        "optimizer_state_bytes": "**optimizer state**: bytes of the optimizer's state tensors (the moments; for "
                                 "fp8coat AdamW also their scales and, with exact masters, the 16-bit "
                                 "remainders).",
        "saved_activation_bytes": f"**saved for backward**: bytes the decoder layers keep for backward for one "
                                  f"micro-batch of {tokens} (counted after training; the LM head and the "
                                  f"loss apart).",
        "saved_vision_bytes": "**saved: vision**: of the bytes saved for backward, those of the vision tower and the "
                              "projector (LLaVA) or patch merger (Qwen2-VL).",
        "saved_lm_bytes": "**saved: LM**: of the bytes saved for backward, those of the language model (embedding "
                          "and decoder layers; the LM head and the loss apart).",
        "fp8_weight_copy_bytes": "**FP8 weight copies**: bytes of the E4M3 weight copies the converted linear layers "
                                 "keep between optimizer steps, held from forward to backward: only with "
                                 "`--cache-fp8-weights` (the recipe option `cache_fp8_weights=True`; off by "
                                 "default, when the weights are quantized in every forward) and never under FSDP.",
    }
    notes += [memory_notes[c[0]] for c in memory]
    if len(seeds) > 1:
        notes.append("**±**: standard deviation over seeds.")
    if diverged:
        notes.append("**diverged**: the run stopped because its loss, weights or optimizer state became NaN or inf, "
                     "or its gradient norm stayed NaN or inf (\"at step N\": the step its error names; \"after step "
                     "N\": the last step it logged). It has no final values: \"–\" where no run of the row finished; "
                     "means, standard deviations and gaps are over the runs that finished.")
    out += ["**Columns**", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _band(runs: list[dict], key: str):
    """Steps logged by every run, with the mean, min and max of ``key`` over the runs at each."""
    per_run = [{r["step"]: r[key] for r in run["history"] if key in r} for run in runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = [[p[s] for p in per_run] for s in steps]
    return (steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def _figure(results: dict, labels: dict[str, str], title: str):
    """Training and validation loss against step: per variant the mean over the seeds that finished, with the
    min–max band over them shaded; each variant has a colour and a line style of its own, so overlapping curves
    stay visible. Each diverged run is a thin dotted line of its variant's colour over the history it logged,
    with a cross at its last point."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v")
    finished = {v: [r for r in runs if not r.get("diverged")] for v, runs in results.items()}
    n_seeds = max((len(runs) for runs in finished.values()), default=0)
    for i, (variant, runs) in enumerate(finished.items()):
        color, style = f"C{i}", styles[i % len(styles)]
        for ax, key, marker in ((ax_t, "loss", None), (ax_v, "val_loss", markers[i % len(markers)])):
            steps, mean, low, high = _band(runs, key)
            if steps:
                ax.plot(steps, mean, color=color, ls=style, marker=marker, lw=1.4, ms=4,
                        label=labels.get(variant, variant))
                if len(runs) > 1:
                    ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
            for run in (r for r in results[variant] if r.get("diverged")):
                points = [(r["step"], r[key]) for r in run.get("history") or [] if key in r]
                if points:
                    ax.plot(*zip(*points), color=color, ls=":", lw=1.0, marker="x", markevery=[len(points) - 1],
                            ms=7, label=f"{labels.get(variant, variant)} seed {run.get('seed')}: "
                                        f"diverged{_stopped_at(run)}")
    how = f"mean of {n_seeds} seeds, shaded: min–max" if n_seeds > 1 else "one seed"
    if _diverged_runs(results):
        how = ("mean of the finished seeds, shaded: min–max" if n_seeds > 1 else "one seed") + "; ×: diverged"
    for ax, name in ((ax_t, "training loss (per step)"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{name}; {how}", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _plot(results: dict, labels: dict[str, str], title: str, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot")
        return
    fig = _figure(results, labels, title)
    try:
        with atomic_file(path) as tmp:  # readers see the old plot or the new one
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
