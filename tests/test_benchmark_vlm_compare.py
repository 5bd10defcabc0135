"""benchmarks.vlm_compare on the CPU: the --dry-run end to end (speed run, seeds in parallel, merged reports) and
the arithmetic of the merged rows (per-seed gaps, the target, ratios to the baseline's speed run)."""

import json

import pytest

from benchmarks import vlm_compare
from fp8coat.train.compare import merge_records


def _run_summary(seed: int, val: float, **extra) -> dict:
    return {"seed": seed, "final_val_loss": val, "caption_exact_match": extra.pop("em", None), **extra}


VARIANTS = ["bf16-torchopt", "coat"]


def _record(variant: str, run: dict) -> dict:
    """What one ``fp8coat compare`` of one variant and one seed writes to compare.json (the keys merged)."""
    return {"variants": [variant], "seeds": [run["seed"]], "baseline": variant, "labels": {variant: variant.upper()},
            "results": {variant: [run]}, "runs_total": 1}


def test_merge_and_rows_arithmetic():
    records = [rec for s, v, c in ((2, 1.90, 1.881), (0, 2.00, 2.02), (1, 2.10, 2.10))  # finished in any order
               for rec in (_record("coat", _run_summary(s, c, em=0.25)),
                           _record("bf16-torchopt", _run_summary(s, v, em=0.5, peak_mem_gib=8.0)))]
    merged = merge_records(records, VARIANTS)
    assert merged["seeds"] == [0, 1, 2] and merged["runs_total"] == 6 and merged["baseline"] == "bf16-torchopt"
    assert list(merged["results"]) == VARIANTS and merged["labels"] == {"bf16-torchopt": "BF16-TORCHOPT",
                                                                        "coat": "COAT"}
    assert [r["seed"] for r in merged["results"]["coat"]] == [0, 1, 2]
    speed = {"results": {"bf16-torchopt": [{"tok_per_s": 1000.0, "peak_mem_gib": 10.0, "saved_vision_bytes": 400,
                                            "saved_lm_bytes": 1000}],
                         "coat": [{"tok_per_s": 1500.0, "peak_mem_gib": 6.0, "saved_vision_bytes": 160,
                                   "saved_lm_bytes": 420}]}}
    rows = {r["variant"]: r for r in vlm_compare.model_rows(merged, speed)}
    coat = rows["coat"]
    assert coat["val_gap_pct"] == pytest.approx([1.0, 0.0, -1.0])
    assert coat["val_gap_pct_mean"] == pytest.approx(0.0, abs=1e-9)
    # baseline std of (2.0, 2.1, 1.9) is 0.1 over a mean of 2.0: 5 %, above the 0.5 % floor
    assert coat["target_pct"] == pytest.approx(5.0)
    assert coat["within_target"] is True
    assert coat["caption_exact_match"] == pytest.approx(0.25)
    assert (coat["tok_per_s_ratio"], coat["peak_mem_ratio"]) == pytest.approx((1.5, 0.6))
    assert (coat["saved_vision_ratio"], coat["saved_lm_ratio"]) == pytest.approx((0.4, 0.42))
    assert rows["bf16-torchopt"]["within_target"] is None  # the baseline is not judged against itself


def test_target_floor_and_a_miss():
    merged = merge_records(
        [_record("bf16-torchopt", _run_summary(s, 2.0, peak_mem_gib=8.0, saved_lm_bytes=100)) for s in (0, 1)]
        + [_record("coat", _run_summary(s, 2.02, peak_mem_gib=4.0 + s, saved_lm_bytes=40)) for s in (0, 1)],
        VARIANTS)
    coat = {r["variant"]: r for r in vlm_compare.model_rows(merged, None)}["coat"]
    assert coat["target_pct"] == 0.5  # identical baseline losses: std 0, the floor applies
    assert coat["val_gap_pct_mean"] == pytest.approx(1.0)
    assert coat["within_target"] is False
    # no speed run: no tok/s; memory from the first seed's accuracy runs
    assert coat["tok_per_s"] is None and coat["memory_from"] == "accuracy run"
    assert (coat["peak_mem_ratio"], coat["saved_lm_ratio"]) == pytest.approx((0.5, 0.4))


def test_rows_without_accuracy_runs():
    empty = {"variants": VARIANTS, "baseline": VARIANTS[0], "labels": {}, "results": {v: [] for v in VARIANTS}}
    speed = {"results": {"bf16-torchopt": [{"tok_per_s": 100.0, "peak_mem_gib": 2.0}],
                         "coat": [{"tok_per_s": 80.0, "peak_mem_gib": 1.0}]}}
    coat = {r["variant"]: r for r in vlm_compare.model_rows(empty, speed)}["coat"]
    assert coat["seeds"] == [] and coat["val_loss_mean"] is None and coat["within_target"] is None
    assert (coat["tok_per_s_ratio"], coat["peak_mem_ratio"]) == pytest.approx((0.8, 0.5))


def test_dry_run_end_to_end(tmp_path):
    assert vlm_compare.main(["--dry-run", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "vlm_compare.json").read_text())
    rows = {r["variant"]: r for r in res["results"]["tiny-llava"]["rows"]}
    assert set(rows) == {"bf16-torchopt", "coat"} and res["results"]["tiny-llava"]["problems"] == []
    for r in rows.values():
        assert r["seeds"] == [0, 1] and len(r["val_gap_pct"]) == 2 and r["tok_per_s"] > 0
    assert 0 < rows["coat"]["saved_vision_ratio"] < 0.6 and 0 < rows["coat"]["saved_lm_ratio"] < 0.45
    for name in ("vlm_compare.md", "tiny-llava.md", "tiny-llava.json", "tiny-llava.png"):
        assert (tmp_path / name).stat().st_size > 0
    merged = json.loads((tmp_path / "tiny-llava.json").read_text())
    assert merged["seeds"] == [0, 1] and all(len(runs) == 2 for runs in merged["results"].values())


def test_warmup_default_and_cap():
    args = vlm_compare.parse_args(["--steps", "1000", "--lr", "2e-4"])
    assert args.warmup_steps == 100
    accuracy = vlm_compare.compare_command(args, "llava-100m", ["coat"], [0], 1000, "/o", speed=False)
    speed = vlm_compare.compare_command(args, "llava-100m", ["coat"], [0], 40, "/o", speed=True)
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert (flag(accuracy, "--warmup-steps"), flag(speed, "--warmup-steps")) == ("100", "40")
    assert flag(accuracy, "--lr") == "0.0002" and flag(accuracy, "--caption-eval") == "256"
    explicit = vlm_compare.parse_args(["--steps", "300", "--warmup-steps", "7"])
    assert flag(vlm_compare.compare_command(explicit, "m", ["coat"], [0], 300, "/o", speed=False),
                "--warmup-steps") == "7"
    assert vlm_compare.parse_args(["--steps", "5"]).warmup_steps == 1


@pytest.mark.parametrize("argv", [["--steps", "0", "--speed-steps", "0"], ["--steps", "-1"],
                                  ["--warmup-steps", "-2"]])
def test_bad_step_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        vlm_compare.parse_args(argv)
    assert "steps" in capsys.readouterr().err


def test_speed_only_runs_no_accuracy(tmp_path, monkeypatch):
    launched = []

    def fake_run_all(commands, jobs, deadline):
        launched.extend(cmd for _, cmd in commands)
        return {log: 0 for log, _ in commands}

    monkeypatch.setattr(vlm_compare, "run_all", fake_run_all)
    assert vlm_compare.main(["--models", "tiny-llava", "--steps", "0", "--speed-steps", "3",
                             "--out", str(tmp_path)]) == 0
    assert len(launched) == 1 and launched[0][launched[0].index("--steps") + 1] == "3"
    res = json.loads((tmp_path / "vlm_compare.json").read_text())["results"]["tiny-llava"]
    assert res["problems"] == [] and all(r["seeds"] == [] for r in res["rows"])
