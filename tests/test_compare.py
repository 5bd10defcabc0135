"""`fp8coat compare`: BF16 with torch's AdamW as the default baseline against coat, the table (row names, gaps,
memory with ratios, column notes), the loss plot (mean and band over seeds), results kept after an interrupted
compare, diverged runs recorded while the compare goes on, and clear errors for flags that do not apply."""

from __future__ import annotations

import importlib
import json
import os
import statistics

import pytest
import torch

from fp8coat.train.cli import build_parser, main
from fp8coat.train.config import TrainConfig
from fp8coat.train.finite import NonFiniteError

pytest.importorskip("transformers")
compare_module = importlib.import_module("fp8coat.train.compare")  # the package re-exports the function

COMMON = ["--model", "tiny", "--tokenizer", "bytes", "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
          "--eval-batches", "2", "--warmup-steps", "2", "--device", "cpu"]


def _run(args) -> int:
    torch.set_num_threads(2)
    return main(args)


def _table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and the rows (keyed by their variant cell) of the first markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[1]: row for row in cells[2:]}


@pytest.mark.slow
def test_default_compare_is_bf16_with_torch_adamw_against_coat(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), "--steps", "3", "--eval-every", "0", "--cache-fp8-weights",
                 *COMMON]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["variants"] == ["bf16-torchopt", "coat"] and data["baseline"] == "bf16-torchopt"
    base, coat = data["results"]["bf16-torchopt"][0], data["results"]["coat"][0]
    assert (base["recipe"], base["optimizer"]) == ("bf16", "torch")
    assert (coat["recipe"], coat["optimizer"]) == ("coat", "fp8coat")
    assert coat["history"][0]["step"] == 1

    header, rows = _table((out / "compare.md").read_text())
    assert header == ["run", "variant", "train loss (last 3 steps)", "val loss", "val gap vs baseline",
                      "train gap vs baseline", "tok/s", "weights", "optimizer state", "saved for backward",
                      "FP8 weight copies"]
    assert rows["`bf16-torchopt`"][0] == "bf16 + torch AdamW (baseline)"
    assert rows["`coat`"][0] == "coat + fp8coat AdamW"
    col = {name: i for i, name in enumerate(header)}
    val_gap = 100 * (coat["final_val_loss"] / base["final_val_loss"] - 1)
    assert rows["`coat`"][col["val gap vs baseline"]] == f"{val_gap:+.2f}%"
    assert rows["`coat`"][col["val loss"]] == f"{coat['final_val_loss']:.4f}"
    assert rows["`coat`"][col["train loss (last 3 steps)"]] == f"{coat['final_train_loss']:.4f}"
    assert coat["param_bytes"] * 2 == base["param_bytes"]  # bf16 weights against fp32 ones
    for key, name in (("param_bytes", "weights"), ("optimizer_state_bytes", "optimizer state"),
                      ("saved_activation_bytes", "saved for backward")):
        ratio = coat[key] / base[key]
        assert rows["`coat`"][col[name]] == f"{coat[key] / 2**20:.2f} MiB ({ratio:.2f}x)"
        assert rows["`bf16-torchopt`"][col[name]] == f"{base[key] / 2**20:.2f} MiB (1.00x)"
    # FP8 moments + 16-bit remainders against fp32 moments; FP8-saved activations against BF16 autocast
    assert coat["optimizer_state_bytes"] / base["optimizer_state_bytes"] < 0.6
    assert coat["saved_activation_bytes"] / base["saved_activation_bytes"] < 0.5
    # --cache-fp8-weights (the BF16 variant has no FP8 weights to keep): the converted linears' cached E4M3 weights,
    # none for BF16, one byte per weight (and 20 B per layer) for coat
    assert base["fp8_weight_copy_bytes"] == 0 < coat["fp8_weight_copy_bytes"]
    assert rows["`coat`"][col["FP8 weight copies"]] == f"{coat['fp8_weight_copy_bytes'] / 2**10:.2f} KiB"
    printed = capsys.readouterr().out
    assert "| coat + fp8coat AdamW | `coat` |" in printed and "Baseline: bf16 + torch AdamW" in printed
    assert (out / "loss.png").stat().st_size > 1000


def _summary(recipe, optimizer, val, train, seed=0, cuda=False, **extra):
    history = [{"step": s, "loss": train + 1.0 / s + 0.01 * seed} for s in (1, 2, 3, 4)]
    history[1]["val_loss"], history[3]["val_loss"] = val + 0.5, val
    summary = {"recipe": recipe, "optimizer": optimizer, "params": 2_000_000, "steps": 40,
               "final_train_loss": train, "final_val_loss": val, "tok_per_s": 1000.0 + seed,
               "optimizer_state_bytes": extra.pop("opt", 16_000_000), "seed": seed, "history": history}
    if cuda:
        summary["peak_mem_gib"] = extra.pop("peak", 2.0)
    else:
        summary["saved_activation_bytes"] = extra.pop("saved", 8_000_000)
    summary.update(extra)
    return summary


def test_table_on_cuda_shows_peak_memory_with_ratios_and_explains_columns():
    results = {
        "bf16": [_summary("bf16", "fp8coat", 3.0, 3.1, s, cuda=True, opt=8_160_000, peak=1.5) for s in (0, 1)],
        "bf16-torchopt": [_summary("bf16", "torch", 3.0 + 0.1 * s, 3.2, s, cuda=True, peak=2.0 + s)
                          for s in (0, 1)],
        "coat": [_summary("coat", "fp8coat", 3.03, 3.22, s, cuda=True, opt=8_160_000, peak=1.0) for s in (0, 1)],
    }
    cfgs = {v: compare_module.variant_config(TrainConfig(), v, 0, "unused") for v in results}
    baseline = compare_module._baseline(cfgs)
    assert baseline == "bf16-torchopt"  # preferred to a bf16 variant listed before it
    labels = {v: compare_module.describe(c) for v, c in cfgs.items()}
    md = compare_module.report(results, labels, baseline, TrainConfig(model="60m", eval_batches=8), [0, 1])
    header, rows = _table(md)
    assert header == ["run", "variant", "train loss (last 20 steps)", "val loss", "val gap vs baseline",
                      "train gap vs baseline", "tok/s", "peak GPU memory", "optimizer state"]
    base_val = statistics.fmean([3.0, 3.1])
    assert rows["`coat`"][3] == "3.0300 ± 0.0000"
    assert rows["`bf16-torchopt`"][3] == f"{base_val:.4f} ± {statistics.stdev([3.0, 3.1]):.4f}"
    val_gaps = [100 * (3.03 / 3.0 - 1), 100 * (3.03 / 3.1 - 1)]  # per seed, against the same seed's baseline
    assert rows["`coat`"][4] == f"{statistics.fmean(val_gaps):+.2f}% ± {statistics.stdev(val_gaps):.2f}%"
    assert rows["`coat`"][5] == f"{100 * (3.22 / 3.2 - 1):+.2f}% ± 0.00%"
    assert rows["`bf16-torchopt`"][4] == rows["`bf16-torchopt`"][5] == "–"
    assert rows["`coat`"][7] == f"1.00 GiB ({1.0 / 3.0:.2f}x)"  # the peak of the worst seed (3 GiB)
    assert rows["`coat`"][8] == f"{8_160_000 / 2**20:.2f} MiB ({8_160_000 / 16_000_000:.2f}x)"
    assert rows["`bf16`"][0] == "bf16 + fp8coat AdamW" and rows["`bf16-torchopt`"][0].endswith("(baseline)")
    notes = md.split("**Columns**")[1]
    for name in ("run", "variant", "train loss (last 20 steps)", "val loss", "tok/s", "peak GPU memory",
                 "optimizer state", "±"):
        assert f"**{name}**" in notes, name
    assert "8 held-out validation batches" in notes and "saved for backward" not in md
    assert "model 60m (2.0M params)" in md.splitlines()[0]


def test_baseline_falls_back_and_partial_results_are_marked():
    def cfgs(*variants):
        return {v: compare_module.variant_config(TrainConfig(), v, 0, "unused") for v in variants}

    assert compare_module._baseline(cfgs("coat", "bf16", "bf16-noexp")) == "bf16"
    assert compare_module._baseline(cfgs("coat-noexp", "fp8-linear")) == "coat-noexp"
    results = {"bf16": [_summary("bf16", "fp8coat", 3.0, 3.1, param_bytes=4_000_000)], "coat": []}
    md = compare_module.report(results, {"bf16": "bf16 + fp8coat AdamW", "coat": "coat + fp8coat AdamW"}, "bf16",
                               TrainConfig(), [0], runs_total=2)
    header, rows = _table(md)
    assert "1 of 2 runs finished." in md and list(rows) == ["`bf16`"]
    assert header[-3:] == ["weights", "optimizer state", "saved for backward"]
    assert rows["`bf16`"][-3] == f"{4_000_000 / 2**20:.2f} MiB (1.00x)"
    assert "add `bf16-torchopt`" in md  # the baseline is not BF16 with torch's AdamW: say how to get it


@pytest.mark.parametrize("variant,label", [
    ("bf16-torchopt", "bf16 + torch AdamW"), ("coat", "coat + fp8coat AdamW"),
    ("coat-noexp", "coat + fp8coat AdamW (no expansion)"),
    ("fp8-linear-fp32master", "fp8-linear + fp8coat AdamW (fp32 params)"),
])
def test_row_names_say_recipe_and_optimizer(variant, label):
    assert compare_module.describe(compare_module.variant_config(TrainConfig(), variant, 0, "x")) == label


def test_fp8_weight_cache_option_applies_to_the_fp8_variants_only():
    base = TrainConfig(cache_fp8_weights=True)
    assert not compare_module.variant_config(base, "bf16-torchopt", 0, "x").cache_fp8_weights
    assert compare_module.variant_config(base, "coat", 0, "x").cache_fp8_weights
    assert compare_module.variant_config(base, "fp8-linear-noexp", 0, "x").cache_fp8_weights
    assert not compare_module.variant_config(TrainConfig(), "coat", 0, "x").cache_fp8_weights


def test_fp8_attention_option_applies_to_the_coat_variants_only():
    base = TrainConfig(fp8_attention=True)
    assert not compare_module.variant_config(base, "bf16-torchopt", 0, "x").fp8_attention
    assert not compare_module.variant_config(base, "fp8-linear", 0, "x").fp8_attention
    coat = compare_module.variant_config(base, "coat-noexp", 0, "x")
    assert coat.fp8_attention
    assert compare_module.describe(coat) == "coat (FP8 attention) + fp8coat AdamW (no expansion)"
    assert not compare_module.variant_config(TrainConfig(), "coat", 0, "x").fp8_attention


def test_fp8attn_modifier_selects_fp8_attention_for_one_coat_variant():
    plain = compare_module.variant_config(TrainConfig(), "coat", 0, "x")
    fp8attn = compare_module.variant_config(TrainConfig(), "coat-fp8attn", 0, "x")
    assert not plain.fp8_attention and fp8attn.fp8_attention
    assert compare_module.describe(fp8attn) == "coat (FP8 attention) + fp8coat AdamW"
    assert fp8attn.out_dir.endswith("coat-fp8attn_seed0")
    with pytest.raises(ValueError, match="coat"):  # an option of the coat recipe only
        compare_module.variant_config(TrainConfig(), "fp8-linear-fp8attn", 0, "x")


def test_plot_draws_the_mean_and_min_max_band_of_each_variant():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {"bf16-torchopt": [_summary("bf16", "torch", 3.0, 3.1, s) for s in (0, 1, 2)],
               "coat": [_summary("coat", "fp8coat", 3.1, 3.2, s) for s in (0, 1, 2)]}
    labels = {"bf16-torchopt": "bf16 + torch AdamW", "coat": "coat + fp8coat AdamW"}
    fig = compare_module._figure(results, labels, "model tiny, 4 steps")
    try:
        ax_t, ax_v = fig.axes
        assert len(ax_t.lines) == len(ax_v.lines) == 2  # one line per variant, not per seed
        assert len(ax_t.collections) == len(ax_v.collections) == 2  # one band per variant
        steps, mean = ax_t.lines[1].get_data()
        assert list(steps) == [1, 2, 3, 4]
        expected = [statistics.fmean(3.2 + 1.0 / s + 0.01 * seed for seed in (0, 1, 2)) for s in (1, 2, 3, 4)]
        assert list(mean) == pytest.approx(expected)
        band = ax_t.collections[1].get_paths()[0].vertices
        assert band[:, 1].min() == pytest.approx(3.2 + 0.25) and band[:, 1].max() == pytest.approx(3.2 + 1.02)
        assert list(ax_v.lines[0].get_data()[0]) == [2, 4]
        assert ax_t.lines[0].get_linestyle() != ax_t.lines[1].get_linestyle()  # overlapping curves stay visible
        for ax in (ax_t, ax_v):
            assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats/token)"
            assert [t.get_text() for t in ax.get_legend().get_texts()] == list(labels.values())
        assert "model tiny" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def _fake_run(cfg) -> dict:
    """What ``train`` leaves for compare: a 3-step metrics log in the run folder, and its summary."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in (1, 2, 3))
    return {key: value for key, value in _summary(cfg.recipe, cfg.optimizer, 3.0, 3.1).items()
            if key not in ("seed", "history")}


def test_interrupted_compare_keeps_the_finished_runs(tmp_path, monkeypatch):
    """The table, the JSON and the plot are written after every run: Ctrl-C in the second run keeps the first."""
    started = []

    def fake_train(cfg, label=None, **kwargs):
        started.append(cfg.out_dir)
        if len(started) == 2:
            raise KeyboardInterrupt
        return _fake_run(cfg)

    monkeypatch.setattr(compare_module, "train", fake_train)
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), "--seeds", "0,1", *COMMON]) == 130
    assert len(started) == 2
    md = (out / "compare.md").read_text()
    assert "1 of 4 runs finished." in md and list(_table(md)[1]) == ["`bf16-torchopt`"]
    data = json.loads((out / "compare.json").read_text())
    assert data["runs_finished"] == 1 and len(data["results"]["bf16-torchopt"]) == 1
    assert data["results"]["bf16-torchopt"][0]["history"][-1]["step"] == 3
    assert (out / "loss.png").stat().st_size > 1000


def test_compare_again_removes_the_earlier_report_before_its_first_run(tmp_path, monkeypatch):
    """The report files of an earlier compare describe runs the new one replaces: they are gone as soon as it
    starts, so a compare interrupted in its first run leaves no report of runs whose folders it wiped."""
    runs = []

    def fake_train(cfg, label=None, **kwargs):
        if runs and runs[-1] == "interrupt":
            raise KeyboardInterrupt
        runs.append(cfg.out_dir)
        return _fake_run(cfg)

    monkeypatch.setattr(compare_module, "train", fake_train)
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), *COMMON]) == 0
    reports = [out / name for name in ("compare.md", "compare.json", "loss.png")]
    assert all(path.exists() for path in reports)
    runs.append("interrupt")
    assert _run(["compare", "--out-dir", str(out), *COMMON]) == 130
    assert not any(path.exists() for path in reports)


@pytest.mark.parametrize("args,message", [
    (["--seeds", "a"], "--seeds: expected comma-separated integers, got 'a'"),
    (["--seeds", "0,0"], "--seeds: 0 is listed twice"),
    (["--recipe", "coat"], "--recipe has no effect in compare"),
    (["--variants", "fp4"], "unknown variant 'fp4'"),
    (["--variants", "coat-fast"], "unknown variant modifier 'fast'"),
    (["--variants", "coat,coat"], "--variants: 'coat' is listed twice"),
    (["--variants", ","], "--variants: name at least one variant"),
])
def test_bad_compare_flags_give_clear_errors_and_leave_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert _run(["compare", "--out-dir", str(out), "--steps", "1", *COMMON, *args]) == 2
    err = capsys.readouterr().err
    assert f"fp8coat compare: error: {message}" in err and "Traceback" not in err
    assert not out.exists()


def test_compare_help_lists_only_flags_that_apply(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--recipe" not in text and "--seeds" in text and "bf16-torchopt,coat" in text
    assert "compare.md" in text  # --out-dir says what compare writes there
    assert build_parser().parse_args(["compare", "--seed", "3"]).seeds == "3"  # --seed is --seeds


@pytest.mark.slow
def test_compare_again_into_the_same_folder_replaces_its_runs(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--out-dir", str(out), "--variants", "coat", "--steps", "2", "--eval-every", "0", *COMMON]
    assert _run(args) == 0
    first = json.loads((out / "compare.json").read_text())["results"]["coat"][0]["history"]
    assert _run(args) == 0
    again = json.loads((out / "compare.json").read_text())["results"]["coat"][0]["history"]
    assert [r["step"] for r in again] == [1, 2] and [r["loss"] for r in again] == [r["loss"] for r in first]


def test_merge_records_joins_runs_and_picks_the_baseline():
    """Records of one seed each: runs joined per variant and sorted by seed, seeds and labels united; without a
    variant order the baseline is the one the records name, else bf16-torchopt, else the first variant."""
    from fp8coat.train.compare import merge_records

    def record(seed, baseline=None, variants=("coat", "bf16-torchopt")):
        return {"config": {"steps": 3}, "baseline": baseline, "labels": {v: v.upper() for v in variants},
                "runs_total": len(variants), "results": {v: [{"seed": seed, "final_val_loss": 1.0 + seed}]
                                                         for v in variants}}

    merged = merge_records([record(2), record(0)])
    assert merged["seeds"] == [0, 2] and merged["variants"] == ["coat", "bf16-torchopt"]
    assert [r["seed"] for r in merged["results"]["coat"]] == [0, 2]
    assert merged["baseline"] == "bf16-torchopt" and merged["labels"]["coat"] == "COAT"
    assert (merged["runs_finished"], merged["runs_total"], merged["config"]) == (4, 4, {"steps": 3})
    assert merge_records([record(0, baseline="coat")])["baseline"] == "coat"
    assert merge_records([record(0, variants=("coat", "fp8-linear"))])["baseline"] == "coat"
    assert merge_records([record(0)], variants=["coat", "bf16-torchopt"])["baseline"] == "coat"


LOSS_MESSAGE = ("the training loss became non-finite at step 37: the run diverged (lower --lr, or check the data); "
                "stopped without writing a checkpoint after it")
STREAK_MESSAGE = ("the gradient norm was NaN or inf in 20 consecutive steps (241 to 260): each was skipped, so the "
                  "weights stopped changing and the run is stuck")


def _diverging_train(monkeypatch, diverge: dict) -> list[tuple[str, int]]:
    """Replace compare's ``train``: the run of (variant folder name, seed) in ``diverge`` writes the metrics of the
    steps listed with it, then raises NonFiniteError with its message; every other run finishes with val loss
    3.0 + 0.1 × seed (coat: + 0.03) and train loss 3.1 + 0.1 × seed. Returns the (variant, seed) of the runs
    started."""
    started = []

    def fake_train(cfg, label=None, **kwargs):
        variant = os.path.basename(cfg.out_dir).rsplit("_seed", 1)[0]
        started.append((variant, cfg.seed))
        os.makedirs(cfg.out_dir, exist_ok=True)
        if (variant, cfg.seed) in diverge:
            steps, message = diverge[(variant, cfg.seed)]
            if steps:
                with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
                    f.writelines(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in steps)
            raise NonFiniteError(message)
        summary = _summary(cfg.recipe, cfg.optimizer, 3.0 + 0.1 * cfg.seed + (0.03 if cfg.recipe == "coat" else 0),
                           3.1 + 0.1 * cfg.seed, cfg.seed, param_bytes=4_000_000)
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in summary["history"])
        return {key: value for key, value in summary.items() if key not in ("seed", "history")}

    monkeypatch.setattr(compare_module, "train", fake_train)
    return started


def test_a_diverged_run_is_recorded_and_the_compare_goes_on(tmp_path, monkeypatch, capsys):
    """coat diverges with the first of two seeds: the two runs after it still run, compare.json keeps its message
    and history, its row says where it diverged, its means and gaps are those of the seed that finished, the
    plot draws its history, and the CLI exits with 1 naming it, after the report."""
    started = _diverging_train(monkeypatch, {("coat", 0): ((1, 2), LOSS_MESSAGE)})
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), "--seeds", "0,1", *COMMON]) == 1
    assert started == [("bf16-torchopt", 0), ("coat", 0), ("bf16-torchopt", 1), ("coat", 1)]
    captured = capsys.readouterr()
    assert (f"fp8coat compare: error: 1 of 4 runs diverged: coat seed 0 at step 37; the report of every run, "
            f"diverged ones included: {out / 'compare.md'}") in captured.err
    assert "coat + fp8coat AdamW seed 0 diverged: the training loss became non-finite at step 37" in captured.err

    data = json.loads((out / "compare.json").read_text())
    assert (data["runs_finished"], data["runs_diverged"], data["runs_total"]) == (3, 1, 4)
    bad, good = data["results"]["coat"]
    assert bad["diverged"] == LOSS_MESSAGE and bad["seed"] == 0 and [r["step"] for r in bad["history"]] == [1, 2]
    assert "final_val_loss" not in bad and "final_train_loss" not in bad
    assert not good.get("diverged") and good["final_val_loss"] == pytest.approx(3.13)

    md = (out / "compare.md").read_text()
    assert "3 of 4 runs finished; 1 diverged: `coat` seed 0 at step 37." in md
    header, rows = _table(md)
    col = {name: i for i, name in enumerate(header)}
    coat = rows["`coat`"]
    assert coat[col["run"]] == "coat + fp8coat AdamW: 1 of 2 seeds finished, diverged: seed 0 at step 37"
    assert coat[col["val loss"]] == "3.1300"  # seed 1 alone: no ± over one run
    assert coat[col["train loss (last 20 steps)"]] == "3.2000"
    assert coat[col["val gap vs baseline"]] == f"{100 * (3.13 / 3.1 - 1):+.2f}% (1 of 2 seeds)"
    assert coat[col["tok/s"]] == "1,001"
    base_val = statistics.fmean([3.0, 3.1])
    assert rows["`bf16-torchopt`"][col["val loss"]] == f"{base_val:.4f} ± {statistics.stdev([3.0, 3.1]):.4f}"
    assert "**diverged**" in md.split("**Columns**")[1]
    assert "| coat + fp8coat AdamW: 1 of 2 seeds finished" in captured.out  # the table printed at the end

    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 1000
    results = data["results"]
    fig = compare_module._figure(results, data["labels"], "title")
    try:
        ax_t = fig.axes[0]
        legend = [t.get_text() for t in ax_t.get_legend().get_texts()]
        assert legend == ["bf16 + torch AdamW", "coat + fp8coat AdamW",
                          "coat + fp8coat AdamW seed 0: diverged at step 37"]
        assert [list(a) for a in ax_t.lines[2].get_data()] == [[1, 2], [4.0, 2.0]]  # its history as logged
        assert list(ax_t.lines[1].get_data()[1]) == [r["loss"] for r in good["history"]]  # the mean leaves it out
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_a_diverged_baseline_leaves_the_other_rows_without_gaps(tmp_path, monkeypatch, capsys):
    """The baseline diverges before logging anything (a streak of NaN gradient norms): its row says where, with
    "–" for its values; coat's row keeps its losses and bytes, with "–" for gaps and no ratios."""
    _diverging_train(monkeypatch, {("bf16-torchopt", 0): ((), STREAK_MESSAGE)})
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), *COMMON]) == 1
    assert "fp8coat compare: error: 1 of 2 runs diverged: bf16-torchopt seed 0 at step 260;" in capsys.readouterr().err
    data = json.loads((out / "compare.json").read_text())
    assert data["results"]["bf16-torchopt"] == [{"recipe": "bf16", "optimizer": "torch", "diverged": STREAK_MESSAGE,
                                                 "seed": 0, "history": []}]
    md = (out / "compare.md").read_text()
    header, rows = _table(md)
    col = {name: i for i, name in enumerate(header)}
    base = rows["`bf16-torchopt`"]
    assert base[col["run"]] == "bf16 + torch AdamW (baseline): diverged at step 260"
    assert base[2:] == ["–"] * (len(header) - 2)
    coat = rows["`coat`"]
    assert coat[col["val loss"]] == "3.0300"
    assert coat[col["val gap vs baseline"]] == coat[col["train gap vs baseline"]] == "–"
    assert coat[col["weights"]] == f"{4_000_000 / 2**20:.2f} MiB"  # no ratio to a baseline without bytes
    assert "It has no finished run (diverged): no gaps and no ratios." in md
    assert (out / "loss.png").exists()


def test_a_diverged_baseline_seed_is_left_out_of_the_gaps():
    """Two seeds, the baseline diverged with seed 1: coat's gap is that of seed 0 alone, and says so."""
    results = {"bf16-torchopt": [_summary("bf16", "torch", 3.0, 3.2, 0),
                                 {"recipe": "bf16", "optimizer": "torch", "seed": 1, "diverged": LOSS_MESSAGE,
                                  "history": []}],
               "coat": [_summary("coat", "fp8coat", 3.03 + 0.01 * s, 3.22, s) for s in (0, 1)]}
    labels = {"bf16-torchopt": "bf16 + torch AdamW", "coat": "coat + fp8coat AdamW"}
    md = compare_module.report(results, labels, "bf16-torchopt", TrainConfig(), [0, 1], runs_total=4)
    header, rows = _table(md)
    assert rows["`coat`"][4] == f"{100 * (3.03 / 3.0 - 1):+.2f}% (1 of 2 seeds)"
    assert rows["`coat`"][3] == f"3.0350 ± {statistics.stdev([3.03, 3.04]):.4f}"  # both coat seeds finished
    assert rows["`bf16-torchopt`"][0] == ("bf16 + torch AdamW (baseline): 1 of 2 seeds finished, diverged: seed 1 "
                                          "at step 37")
    assert rows["`bf16-torchopt`"][3] == "3.0000"
    assert "Its run of seed 1 diverged: the gaps leave out that seed." in md
    assert "3 of 4 runs finished; 1 diverged: `bf16-torchopt` seed 1 at step 37." in md


def test_every_run_diverged_still_writes_the_report(tmp_path, monkeypatch, capsys):
    _diverging_train(monkeypatch, {("bf16-torchopt", 0): ((1,), LOSS_MESSAGE), ("coat", 0): ((), "weird")})
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), *COMMON]) == 1
    err = capsys.readouterr().err
    assert "fp8coat compare: error: all 2 runs diverged: bf16-torchopt seed 0 at step 37, coat seed 0;" in err
    data = json.loads((out / "compare.json").read_text())
    assert (data["runs_finished"], data["runs_diverged"]) == (0, 2)
    assert [r["diverged"] for runs in data["results"].values() for r in runs] == [LOSS_MESSAGE, "weird"]
    md = (out / "compare.md").read_text()
    assert "0 of 2 runs finished; 2 diverged: `bf16-torchopt` seed 0 at step 37, `coat` seed 0." in md
    _, rows = _table(md)
    assert rows["`bf16-torchopt`"][0] == "bf16 + torch AdamW (baseline): diverged at step 37"
    assert rows["`coat`"][0] == "coat + fp8coat AdamW: diverged"  # no step in its message, nothing logged
    assert rows["`coat`"][2:] == ["–"] * 5
    assert (out / "loss.png").exists()


@pytest.mark.parametrize("message,history,where", [
    (LOSS_MESSAGE, [{"step": 36}], " at step 37"),
    (STREAK_MESSAGE, [], " at step 260"),
    ("model.embed_tokens.weight became non-finite at step 8: the run diverged; stopped without writing its "
     "checkpoint (the newest checkpoint is runs/x/checkpoints/step_000004)", [], " at step 8"),
    ("something else", [{"step": 1}, {"step": 2}], " after step 2"),
    ("something else", [], ""),
])
def test_where_a_diverged_run_stopped(message, history, where):
    assert compare_module._stopped_at({"diverged": message, "history": history}) == where


def test_a_run_whose_loss_becomes_nan_is_recorded_as_diverged(tmp_path, monkeypatch, capsys):
    """End to end with real training (BF16 with torch's AdamW: no Triton kernels to interpret on the CPU): the
    loss of seed 1 becomes NaN at its second step, so train stops it; seeds 0 and 2 finish, and the row's val
    loss is their mean."""
    from fp8coat.train import loop

    original, real_train = loop._loss, compare_module.train

    def train_poisoning_seed_1(cfg, **kwargs):
        calls = []

        def nan_from_step_2(model, ids, autocast, head=None):
            loss = original(model, ids, autocast, head)
            if torch.is_grad_enabled():
                calls.append(1)
                if len(calls) >= 2:
                    loss = loss * float("nan")
            return loss

        monkeypatch.setattr(loop, "_loss", nan_from_step_2 if cfg.seed == 1 else original)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare_module, "train", train_poisoning_seed_1)
    out = tmp_path / "cmp"
    assert _run(["compare", "--out-dir", str(out), "--variants", "bf16-torchopt", "--seeds", "0,1,2", "--steps", "3",
                 "--eval-every", "0", *COMMON]) == 1
    assert "1 of 3 runs diverged: bf16-torchopt seed 1 at step 2;" in capsys.readouterr().err
    runs = json.loads((out / "compare.json").read_text())["results"]["bf16-torchopt"]
    assert [r["seed"] for r in runs] == [0, 1, 2]
    assert runs[1]["diverged"].startswith("the training loss became non-finite at step 2")
    assert [r["step"] for r in runs[1]["history"]] == [1] and "final_val_loss" not in runs[1]
    finished = [runs[0]["final_val_loss"], runs[2]["final_val_loss"]]
    _, rows = _table((out / "compare.md").read_text())
    row = rows["`bf16-torchopt`"]
    assert row[0] == "bf16 + torch AdamW (baseline): 2 of 3 seeds finished, diverged: seed 1 at step 2"
    assert row[3] == f"{statistics.fmean(finished):.4f} ± {statistics.stdev(finished):.4f}"
