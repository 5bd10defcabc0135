"""benchmarks.vlm_compare on the CPU: the --dry-run end to end (speed run, seeds in parallel, merged reports) and
the arithmetic of the merged rows (per-seed gaps, the target, ratios to the baseline's speed run)."""

import json

import pytest

from benchmarks import vlm_compare


def _run_summary(seed: int, val: float, **extra) -> dict:
    return {"seed": seed, "final_val_loss": val, "caption_exact_match": extra.pop("em", None), **extra}


def _record(results: dict, seeds: list[int]) -> dict:
    return {"variants": list(results), "seeds": seeds, "baseline": "bf16-torchopt",
            "labels": {v: v for v in results}, "results": results, "runs_total": sum(map(len, results.values()))}


def test_merge_and_rows_arithmetic():
    seed_records = [_record({"bf16-torchopt": [_run_summary(s, v, em=0.5)],
                             "coat": [_run_summary(s, c, em=0.25)]}, [s])
                    for s, v, c in ((0, 2.00, 2.02), (1, 2.10, 2.10), (2, 1.90, 1.881))]
    merged = vlm_compare.merge_seeds(seed_records)
    assert merged["seeds"] == [0, 1, 2] and merged["runs_total"] == 6
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
    merged = vlm_compare.merge_seeds([_record({"bf16-torchopt": [_run_summary(s, 2.0)],
                                               "coat": [_run_summary(s, 2.02)]}, [s]) for s in (0, 1)])
    coat = {r["variant"]: r for r in vlm_compare.model_rows(merged, None)}["coat"]
    assert coat["target_pct"] == 0.5  # identical baseline losses: std 0, the floor applies
    assert coat["val_gap_pct_mean"] == pytest.approx(1.0)
    assert coat["within_target"] is False
    assert coat["tok_per_s"] is None and coat["saved_lm_ratio"] is None  # no speed run


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
