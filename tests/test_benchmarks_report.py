"""benchmarks.report: the tables of docs/benchmarks.md generated from result files (CPU only, no torch needed)."""

import json

import pytest

from benchmarks import report
from benchmarks.report import ANCHOR_MISSING, ReportError


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _optimizer_run(rows, date="2026-12-01 10:00 UTC", commit="abc1234"):
    return {"config": {}, "rows": rows, "checks": {}, "errors": {}, "skipped": [],
            "env": {"gpu": "NVIDIA H100"}, "meta": {"date": date, "commit": commit,
                                                   "command": "python -m benchmarks.bench_optimizer --steps 15"}}


def _row_of(lines, label):
    found = [line for line in lines if line.startswith(f"| {label} |")]
    assert len(found) == 1, (label, lines)
    return [c.strip() for c in found[0].strip("|").split("|")]


def test_optimizer_table_values_ratio_and_provenance(tmp_path):
    folder = tmp_path / "optimizer"
    _write(folder / "run.json", _optimizer_run({
        "torch_fused_fp32": {"ms": 8.0, "ms_b2b": 7.5, "pct_copy": 80.0, "state_B_per_param": 8.0},
        "fp8coat_fp32_exp": {"ms": 3.2, "ms_b2b": 3.0, "pct_copy": 85.0, "state_B_per_param": 2.08},
    }))
    lines = report.optimizer_table(report.load_runs(folder))
    row = _row_of(lines, report.OPTIMIZER_LABELS["fp8coat_fp32_exp"])
    # value, anchor of the same run, anchor / value (a time: higher is faster), then date, commit, GPU, file
    assert row[1:4] == ["3.20", "8.00", "2.50×"]
    assert row[5] == "85%"
    assert row[-4:] == ["2026-12-01", "`abc1234`", "NVIDIA H100", "`optimizer/run.json`"]
    assert _row_of(lines, report.OPTIMIZER_LABELS["torch_fused_fp32"])[3] == "1.00×"
    assert "- `optimizer/run.json`: `python -m benchmarks.bench_optimizer --steps 15`" in lines
    assert any("`fp8coat_fp32_exp` 85% met" in line for line in lines)


def test_newest_run_wins_older_runs_listed_and_missing_anchor_marked(tmp_path):
    folder = tmp_path / "optimizer"
    _write(folder / "a-old.json", _optimizer_run({"torch_fused_fp32": {"ms": 8.0}, "fp8coat_fp32_exp": {"ms": 4.0}},
                                                 date="2026-11-01"))
    # newer run without the anchor row: the ratio cannot be computed from another run's anchor
    _write(folder / "b-new.json", _optimizer_run({"fp8coat_fp32_exp": {"ms": 5.0}}, date="2026-11-02",
                                                 commit="def5678"))
    lines = report.optimizer_table(report.load_runs(folder))
    row = _row_of(lines, report.OPTIMIZER_LABELS["fp8coat_fp32_exp"])
    assert row[1] == "5.00"
    assert row[2] == "–" and row[3] == ANCHOR_MISSING
    assert row[7] == "4.00 ms (2.00×)"  # the older run, with its own anchor
    assert row[-3] == "`def5678`"
    # the anchor row itself comes from the only run that has it
    assert _row_of(lines, report.OPTIMIZER_LABELS["torch_fused_fp32"])[-1] == "`optimizer/a-old.json`"


def test_provenance_from_runs_json_when_the_file_has_none(tmp_path):
    folder = tmp_path / "optimizer"
    data = _optimizer_run({"torch_fused_fp32": {"ms": 8.0}})
    del data["meta"], data["env"]
    _write(folder / "old.json", data)
    _write(folder / "runs.json", {"files": {"old.json": {"date": "2026-11-29", "commit": "ea0b525", "gpu": "H200",
                                                         "command": "bash scripts/gpu_check.sh"}}})
    lines = report.optimizer_table(report.load_runs(folder))
    assert _row_of(lines, report.OPTIMIZER_LABELS["torch_fused_fp32"])[-4:-1] == ["2026-11-29", "`ea0b525`", "H200"]
    assert "- `optimizer/old.json`: `bash scripts/gpu_check.sh`" in lines


def test_unknown_provenance_is_marked(tmp_path):
    folder = tmp_path / "optimizer"
    data = _optimizer_run({"torch_fused_fp32": {"ms": 8.0}})
    del data["meta"], data["env"]
    _write(folder / "bare.json", data)
    row = _row_of(report.optimizer_table(report.load_runs(folder)), report.OPTIMIZER_LABELS["torch_fused_fp32"])
    assert row[-4:-1] == [report.UNKNOWN] * 3


def _layers_run(linear=None, model4=None):
    return {"config": {}, "rows": {"linear": linear or {}, "layer": {}, "model4": model4 or {}},
            "errors": {}, "skipped": [], "env": {"gpu": "NVIDIA H200"},
            "meta": {"date": "2026-12-01", "commit": "abc1234", "command": "python -m benchmarks.bench_layers"}}


def test_linear_and_model4_ratios(tmp_path):
    folder = tmp_path / "layers"
    linear = {
        "64->64 bf16": {"shape": "64->64", "impl": "bf16", "b2b_ms": 3.0, "graph_ms": 2.0, "ref": "64->64 bf16"},
        "64->64 fp8": {"shape": "64->64", "impl": "fp8", "b2b_ms": 2.0, "graph_ms": 1.0, "ref": "64->64 bf16"},
    }
    model4 = {"fp8coat_x": {"tok_per_s": 130_000.0, "peak_GiB": 9.0},
              "torchao_fp8_compiled_adamwfp8": {"tok_per_s": 100_000.0, "peak_GiB": 12.0}}
    _write(folder / "run.json", _layers_run(linear, model4))
    runs = report.load_runs(folder)
    lin = report.linear_table(runs)
    row = _row_of(lin, "64->64")
    assert row[1:8] == ["fp8", "2.000", "3.000", "1.50×", "1.000", "2.000", "2.00×"]
    assert "met by every row" in "\n".join(lin)
    m4 = report.model4_table(runs)
    row = _row_of(m4, "`fp8coat_x`")
    assert row[1] == "130,000" and row[2].endswith("100,000") and row[3] == "1.30×"
    assert "`fp8coat_x` 130,000 tok/s met, 9.00 GiB met" in "\n".join(m4)
    assert report.layer_table(runs) == ["(no layer rows in `docs/results/layers/`)"]


def test_model4_without_any_anchor(tmp_path):
    folder = tmp_path / "layers"
    _write(folder / "run.json", _layers_run(model4={"fp8coat_x": {"tok_per_s": 1000.0}}))
    row = _row_of(report.model4_table(report.load_runs(folder)), "`fp8coat_x`")
    assert row[2] == "–" and row[3] == ANCHOR_MISSING


def _compare(results):
    return {"config": {}, "results": {v: [{"final_val_loss": x, "seed": i} for i, x in enumerate(xs)]
                                      for v, xs in results.items()},
            "meta": {"date": "2026-12-01", "commit": "abc1234", "gpu": "H200", "command": "bash scripts/x.sh"}}


def test_accuracy_gap_from_the_means_and_missing_anchor(tmp_path):
    folder = tmp_path / "accuracy"
    _write(folder / "pretrain-t.json", _compare({"bf16-torchopt": [3.0, 3.2], "coat": [3.03, 3.23]}))
    _write(folder / "finetune-t.json", _compare({"coat": [4.0]}))
    lines = report.accuracy_table(report.load_runs(folder))
    coat = next(r for r in lines if r.startswith("| pretrain | `coat` |"))
    assert "+0.97%" in coat  # 3.13 / 3.10 - 1
    assert "3.1300 ± 0.1414 (2 seeds)" in coat
    finetune = next(r for r in lines if r.startswith("| finetune | `coat` |"))
    assert ANCHOR_MISSING in finetune


@pytest.mark.parametrize("content, expect", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"rows": {"torch_fused_fp32": {"ms": "fast"}}}), "'ms' is 'fast', expected a number"),
    (json.dumps({"config": {}}), "no object at rows"),
    (json.dumps({"config": {"dry_run": True}, "rows": {}}), "a --dry-run result"),
])
def test_malformed_result_file_names_the_file(tmp_path, content, expect):
    bad = _write(tmp_path / "optimizer" / "broken.json", content)
    with pytest.raises(ReportError) as info:
        report.optimizer_table(report.load_runs(tmp_path / "optimizer"))
    assert str(bad) in str(info.value) and expect in str(info.value)


def test_malformed_compare_file_names_the_file(tmp_path):
    bad = _write(tmp_path / "accuracy" / "pretrain-x.json", {"results": {"coat": [{"final_val_loss": None}]}})
    with pytest.raises(ReportError, match="pretrain-x.json"):
        report.accuracy_table(report.load_runs(tmp_path / "accuracy"))
    assert bad.exists()


def test_main_rewrites_between_markers_and_reports_errors(tmp_path, capsys):
    results = tmp_path / "results"
    _write(results / "optimizer" / "run.json", _optimizer_run({"torch_fused_fp32": {"ms": 8.0}}))
    doc = tmp_path / "bench.md"
    names = list(report.TABLES)
    doc.write_text("# B\n\nhand-written\n\n" + "\n\n".join(
        f"{report.begin_marker(n)}\nstale\n{report.end_marker(n)}" for n in names) + "\n\nafter\n")
    assert report.main(["--results", str(results), "--doc", str(doc), "--check"]) == 1
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "stale" not in text and "hand-written" in text and text.endswith("after\n")
    assert "| 8.00 | 8.00 | 1.00× |" in text
    assert "(no results in `docs/results/accuracy/`)" in text
    assert report.main(["--results", str(results), "--doc", str(doc), "--check"]) == 0

    doc.write_text("no markers\n")
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 2
    assert "no '<!-- report:optimizer begin" in capsys.readouterr().err

    _write(results / "optimizer" / "zz.json", "{")
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 2
    assert "zz.json" in capsys.readouterr().err


def test_repository_benchmarks_doc_is_up_to_date():
    """docs/benchmarks.md holds exactly the tables the committed result files give."""
    assert report.main(["--check"]) == 0
