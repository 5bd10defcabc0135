"""benchmarks.report: the tables of docs/benchmarks.md generated from result files (CPU only; torch only in the
one benchmark dry run, a subprocess)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

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
    (json.dumps({"meta": ["2026-12-01"], "rows": {}}), "\"meta\" is ['2026-12-01'], expected an object"),
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


def _llama_entry(row, batch, seq=2048, tok_s=None, oom=False, peak=None, first=None, compiled=True):
    """One (row, batch) entry of ``benchmarks.llama7b``'s ``rows`` (its ROW_KEYS that the table reads)."""
    ok = tok_s is not None
    return {"row": row, "batch": batch, "seq": seq, "compiled": compiled, "ok": ok, "oom": oom,
            "tok_s": tok_s, "step_ms": batch * seq / tok_s * 1e3 if ok else None, "peak_gib": peak,
            "first_step_s": first, "build_s": 12.0, "loss": 10.4 if ok else None}


def _llama_run(entries, seq=2048, date="2026-12-06 10:00 UTC", commit="abc1234"):
    return {"config": {"seq": seq, "device": "cuda", "dry_run": False}, "rows": entries, "errors": {},
            "skipped": [], "meta": {"date": date, "commit": commit, "gpu": "NVIDIA H200",
                                    "command": f"python -m benchmarks.llama7b --out $OUT --seq {seq}"}}


def test_llama7b_largest_batch_oom_and_ratios(tmp_path):
    folder = tmp_path / "llama7b"
    _write(folder / "seq2048.json", _llama_run([
        _llama_entry("fp8coat_best", 16, tok_s=20_000.0, peak=100.0, first=90.0),
        _llama_entry("fp8coat_best", 20, tok_s=22_000.0, peak=120.5, first=95.25),
        _llama_entry("fp8coat_best", 24, oom=True, peak=139.0),
        _llama_entry(report.LLAMA7B_TORCHAO, 8, tok_s=17_500.0, peak=94.2),
        _llama_entry(report.LLAMA7B_TORCHAO, 10, tok_s=17_000.0, peak=108.3),  # larger but slower
        _llama_entry(report.LLAMA7B_BF16, 3, tok_s=12_000.0, peak=115.7),
        _llama_entry("fp8coat_exact", 16, oom=True),
    ]))
    _write(folder / "seq4096.json", _llama_run([
        _llama_entry("fp8coat_best", 8, seq=4096, tok_s=18_000.0),
        _llama_entry("fp8coat_best", 10, seq=4096, oom=True),
    ], seq=4096, date="2026-12-06 11:00 UTC", commit="def5678"))
    lines = report.llama7b_table(report.load_runs(folder))
    best = _row_of(lines, "`fp8coat_best` | 2048")
    # largest batch that fit with the smallest that ran out of memory, its tok/s; the best tok/s over the batches
    # over torchao's best (its batch 8, not its larger and slower 10) and BF16 compiled's
    assert best[2:9] == ["20 (24 OOM)", "22,000", "22,000 (20)", "1.26×", "1.83×", "120.50", "95.2"]
    assert best[-4:] == ["2026-12-06", "`abc1234`", "NVIDIA H200", "`llama7b/seq2048.json`"]
    assert _row_of(lines, f"`{report.LLAMA7B_TORCHAO}` | 2048")[2:6] == ["10", "17,000", "17,500 (8)", "1.00×"]
    # a row that never fit: no speed, but the batch that ran out of memory
    assert _row_of(lines, "`fp8coat_exact` | 2048")[2:7] == ["– (16 OOM)", "–", "–", "–", "–"]
    # seq 4096 was measured without the anchors
    long = _row_of(lines, "`fp8coat_best` | 4096")
    assert long[2:7] == ["8 (10 OOM)", "18,000", "18,000 (8)", ANCHOR_MISSING, ANCHOR_MISSING]
    assert long[-3] == "`def5678`"
    text = "\n".join(lines)
    assert "`fp8coat_best` seq 2048: batch 20 met, best 22,000 tok/s met" in text
    assert "`fp8coat_exact` seq 2048: batch none MISSED, best – tok/s MISSED" in text
    assert "`fp8coat_best` seq 4096: batch 8 met" in text
    assert "- `llama7b/seq4096.json`: `python -m benchmarks.llama7b --out $OUT --seq 4096`" in lines


def test_llama7b_newest_run_of_a_seq_and_its_own_anchors(tmp_path):
    folder = tmp_path / "llama7b"
    _write(folder / "a.json", _llama_run([_llama_entry("fp8coat_best", 16, tok_s=19_000.0),
                                          _llama_entry(report.LLAMA7B_TORCHAO, 8, tok_s=17_000.0)],
                                         date="2026-12-01"))
    # the newer run: fp8coat only, batch 20 failed (not out of memory), run eagerly
    _write(folder / "b.json", _llama_run([_llama_entry("fp8coat_best", 16, tok_s=15_000.0, compiled=False),
                                          _llama_entry("fp8coat_best", 20, compiled=False),
                                          _llama_entry("fp8coat_best", 16, tok_s=21_000.0)], date="2026-12-02"))
    lines = report.llama7b_table(report.load_runs(folder))
    row = _row_of(lines, "`fp8coat_best` | 2048")
    assert row[2:6] == ["16", "21,000", "21,000 (16)", ANCHOR_MISSING]  # not the older run's torchao
    assert row[-1] == "`llama7b/b.json`"
    assert _row_of(lines, "`fp8coat_best` (eager) | 2048")[2:4] == ["16 (20 failed)", "15,000"]
    assert _row_of(lines, f"`{report.LLAMA7B_TORCHAO}` | 2048")[-1] == "`llama7b/a.json`"


@pytest.mark.parametrize("name", ["llama7b", "compile_time", "vlm"])
@pytest.mark.parametrize("make", [lambda folder: None, lambda folder: folder.mkdir()])
def test_new_tables_without_results_say_so(tmp_path, make, name):
    folder_name, build = report.TABLES[name]
    make(tmp_path / folder_name)
    assert build(report.load_runs(tmp_path / folder_name)) == [f"(no result yet in `docs/results/{folder_name}/`)"]


@pytest.mark.parametrize("rows, expect", [
    ({"fp8coat_best": {}}, "no list at rows"),
    ([_llama_entry("fp8coat_best", 16, tok_s=1.0) | {"tok_s": "fast"}], "rows[0]: 'tok_s' is 'fast'"),
    ([{"row": "fp8coat_best", "batch": 16, "ok": True, "tok_s": 1.0}], "rows[0]: 'seq' is None"),
    ([_llama_entry("fp8coat_best", 16) | {"ok": None}], "rows[0]: 'ok' is None"),
])
def test_malformed_llama7b_file_names_the_file(tmp_path, rows, expect):
    bad = _write(tmp_path / "llama7b" / "broken.json", _llama_run(rows))
    with pytest.raises(ReportError) as info:
        report.llama7b_table(report.load_runs(tmp_path / "llama7b"))
    assert str(bad) in str(info.value) and expect in str(info.value)


def test_llama7b_dry_run_output_renders(tmp_path):
    """The benchmark's own --dry-run output (CPU, tiny shapes): refused as a measurement, rendered on request."""
    root = Path(report.__file__).resolve().parents[1]
    out = tmp_path / "llama7b"
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-m", "benchmarks.llama7b", "--dry-run", "--out", str(out), "--steps", "1",
                    "--warmup", "1", "--rows", "fp8coat_best,fp8coat_exact,bf16amp_compiled"],
                   cwd=root, env=env, check=True, capture_output=True, timeout=300)
    with pytest.raises(ReportError, match="llama7b.json: a --dry-run result"):
        report.load_runs(out)
    data = json.loads((out / "llama7b.json").read_text())
    tok_s = {(r["row"], r["batch"]): r["tok_s"] for r in data["rows"] if r["ok"]}
    lines = report.llama7b_table(report.load_runs(out, dry_runs=True))
    largest = max(b for name, b in tok_s if name == "fp8coat_best")
    best = _row_of(lines, "`fp8coat_best` (eager) | 32")
    assert best[2] == str(largest)
    assert best[3] == f"{tok_s['fp8coat_best', largest]:,.0f}"
    fastest = max((b for name, b in tok_s if name == "fp8coat_best"), key=lambda b: tok_s["fp8coat_best", b])
    assert best[4] == f"{tok_s['fp8coat_best', fastest]:,.0f} ({fastest})"
    assert best[5] == ANCHOR_MISSING  # torchao is skipped on the CPU
    assert best[6] == f"{tok_s['fp8coat_best', fastest] / tok_s['bf16amp_compiled', 2]:.2f}×"
    assert best[-4:-1] == [data["meta"]["date"].split(" ")[0], f"`{data['meta']['commit']}`", "none (CPU)"]
    assert "not measured (no fp8coat row at seq 2048 or 4096)" in "\n".join(lines)


def _ct_row(layers, first, library="fp8coat", compiled=True, step1=None):
    """One row of ``benchmarks.compile_time``'s result (all its keys)."""
    return {"layers": layers, "recipe": {"fp8coat": "coat", "torchao": "torchao-float8", "bf16": "bf16"}[library],
            "batch": 1, "seq": 2048, "first_step_s": first, "two_steps_s": first + 2.0, "later_step_ms": 400.0,
            "graphs": 2 if compiled else 0, "fp8coat": "/repo/fp8coat", "library": library, "compiled": compiled,
            "build_s": 3.0, "step1_s": first - 3.0 if step1 is None else step1}


def _ct_file(rows, args="--layers 4,32 --tag after"):
    """A compile_time result: its sys.argv as "command", no meta."""
    return {"command": f"/repo/benchmarks/compile_time.py {args} --out /out", "rows": rows}


def test_compile_time_against_torchao_of_the_same_gpu_model(tmp_path):
    folder = tmp_path / "compile_time"
    _write(folder / "compile_time-after.json", _ct_file([_ct_row(4, 20.0), _ct_row(32, 55.0)]))
    _write(folder / "compile_time-eager-after.json",
           _ct_file([_ct_row(32, 9.0, compiled=False, step1=6.5)], "--eager --layers 32"))
    _write(folder / "compile_time-torchao-after.json",
           _ct_file([_ct_row(4, 16.0, "torchao"), _ct_row(32, 50.0, "torchao")], "--library torchao --tag after"))
    # a newer torchao file from another GPU model, and a BF16 file whose GPU nobody recorded
    _write(folder / "compile_time-torchao-h200.json", _ct_file([_ct_row(32, 40.0, "torchao")], "--library torchao"))
    _write(folder / "compile_time-bf16.json", _ct_file([_ct_row(32, 70.0, "bf16")], "--library bf16"))
    h100 = {"date": "2026-12-06 09:00 UTC", "commit": "abc1234", "gpu": "NVIDIA H100 80GB HBM3"}
    _write(folder / "runs.json", {"files": {
        "compile_time-after.json": h100, "compile_time-eager-after.json": h100,
        "compile_time-torchao-after.json": h100, "compile_time-bf16.json": {"date": "2026-12-06 09:30 UTC"},
        "compile_time-torchao-h200.json": {"date": "2026-12-07 09:00 UTC", "gpu": "NVIDIA H200"}}})
    lines = report.compile_time_table(report.load_runs(folder))
    # first step done, second, build, first step alone, graphs, later step ms, torchao's time, time / torchao's
    assert _row_of(lines, "fp8coat `coat` | compiled | 32")[3:12] == [
        "1 × 2048", "55.0", "57.0", "3.0", "52.0", "2", "400.0", "50.0", "1.10×"]
    assert _row_of(lines, "fp8coat `coat` | compiled | 4")[10:12] == ["16.0", "1.25×"]
    assert _row_of(lines, "fp8coat `coat` | eager | 32")[10:12] == ["50.0", "0.18×"]
    assert _row_of(lines, "fp8coat `coat` | compiled | 32")[-4:] == [
        "2026-12-06", "`abc1234`", "NVIDIA H100 80GB HBM3", "`compile_time/compile_time-after.json`"]
    # the H200 torchao file is the newest torchao 32-layer row, its own anchor; not the H100 rows' anchor
    torchao = _row_of(lines, f"{report.COMPILE_LIBRARIES['torchao']} | compiled | 32")
    assert torchao[10:12] == ["40.0", "1.00×"] and torchao[-1] == "`compile_time/compile_time-torchao-h200.json`"
    assert _row_of(lines, f"{report.COMPILE_LIBRARIES['bf16']} | compiled | 32")[10:12] == ["–", ANCHOR_MISSING]
    text = "\n".join(lines)
    assert "(a separate process): `compile_time/compile_time-torchao-after.json`." in text
    assert "`coat` compiled, 32 layers: 1.10× torchao met" in text
    assert "`coat` eager, 32 layers: first step 6.5 s met" in text
    # the recorded sys.argv in today's form
    assert ("- `compile_time/compile_time-after.json`: `python -m benchmarks.compile_time --layers 4,32 --tag after "
            "--out /out`") in lines


def test_compile_time_targets_missed_and_files_before_library_and_eager(tmp_path):
    folder = tmp_path / "compile_time"
    old = _ct_row(32, 90.0)
    for key in ("library", "compiled", "build_s", "step1_s"):
        del old[key]
    _write(folder / "compile_time.json", _ct_file([old]))
    _write(folder / "compile_time-eager.json", _ct_file([_ct_row(32, 14.0, compiled=False, step1=12.0)]))
    _write(folder / "compile_time-torchao.json", _ct_file([_ct_row(32, 50.0, "torchao")]))
    _write(folder / "runs.json", {"files": {n: {"gpu": "NVIDIA H200"} for n in (
        "compile_time.json", "compile_time-eager.json", "compile_time-torchao.json")}})
    lines = report.compile_time_table(report.load_runs(folder))
    assert _row_of(lines, "fp8coat `coat` | compiled | 32")[6:12] == ["–", "–", "2", "400.0", "50.0", "1.80×"]
    text = "\n".join(lines)
    assert "`coat` compiled, 32 layers: 1.80× torchao MISSED" in text
    assert "`coat` eager, 32 layers: first step 12.0 s MISSED" in text


def test_compile_time_dry_run_is_refused_unless_asked(tmp_path):
    folder = tmp_path / "compile_time"
    _write(folder / "compile_time.json", _ct_file([_ct_row(2, 14.4)], "--dry-run --layers 2"))
    with pytest.raises(ReportError, match="compile_time.json: a --dry-run result"):
        report.load_runs(folder)
    row = _row_of(report.compile_time_table(report.load_runs(folder, dry_runs=True)), "fp8coat `coat` | compiled")
    assert row[-4:-1] == [report.UNKNOWN] * 3 and row[11] == ANCHOR_MISSING


@pytest.mark.parametrize("rows, expect", [
    ({"4": _ct_row(4, 1.0)}, "no list at rows"),
    ([_ct_row(4, 1.0) | {"first_step_s": None}], "rows[0]: 'first_step_s' is None"),
    ([_ct_row(4, 1.0) | {"library": "jax"}], "rows[0]: 'library' is 'jax'"),
    ([_ct_row(4, 1.0), _ct_row(32, 1.0) | {"layers": "32"}], "rows[1]: 'layers' is '32'"),
])
def test_malformed_compile_time_file_names_the_file(tmp_path, rows, expect):
    bad = _write(tmp_path / "compile_time" / "compile_time.json", _ct_file(rows))
    with pytest.raises(ReportError) as info:
        report.compile_time_table(report.load_runs(tmp_path / "compile_time"))
    assert str(bad) in str(info.value) and expect in str(info.value)


def _vlm_row(variant, losses, gaps, tok_s, vision, lm, peak=None):
    """One row of ``benchmarks.vlm_compare``'s ``results.<model>.rows`` (all its keys; the ratios it stores are not
    read: left None)."""
    return {"variant": variant, "label": variant, "seeds": list(range(len(losses))),
            "val_loss_mean": statistics.fmean(losses), "val_loss_std": statistics.stdev(losses),
            "val_gap_pct": gaps, "val_gap_pct_mean": statistics.fmean(gaps), "val_gap_pct_std": 0.0,
            "target_pct": None, "within_target": None, "caption_exact_match": 0.25, "tok_per_s": tok_s,
            "tok_per_s_ratio": None, "peak_mem_gib": peak, "peak_mem_ratio": None, "saved_vision_bytes": vision,
            "saved_vision_ratio": None, "saved_lm_bytes": lm, "saved_lm_ratio": None}


def _vlm_file(results, command="python -m benchmarks.vlm_compare --out $OUT", device="NVIDIA H200"):
    return {"meta": {"date": "2026-12-06 12:00 UTC", "commit": "abc1234", "command": command, "device": device},
            "results": {m: {"rows": rows, "problems": problems, "config": {"model": m}}
                        for m, (rows, problems) in results.items()},
            "seconds": 500.0}


def test_vlm_gap_target_and_ratios_to_the_baseline(tmp_path):
    folder = tmp_path / "vlm"
    _write(folder / "vlm_compare.json", _vlm_file({
        "llava-100m": ([_vlm_row("bf16-torchopt", [3.00, 3.02, 3.04], [0.0, 0.0, 0.0], 50_000.0, 1000, 1000, 10.0),
                        _vlm_row("coat", [3.01, 3.03, 3.07], [0.2, 0.4, 0.9], 40_000.0, 300, 500, 6.0),
                        _vlm_row("fp8-linear-torchopt", [3.0, 3.1, 3.2], [5.0, 6.0, 7.0], 45_000.0, 1200, 1100)],
                       []),
        # one-seed std below 0.5%: the target is 0.5%; the baseline's speed was not measured
        "qwen2vl-100m": ([_vlm_row("bf16-torchopt", [2.0, 2.0], [0.0, 0.0], None, 1000, 1000),
                          _vlm_row("coat", [2.012, 2.016], [0.6, 0.8], 30_000.0, 400, 440)],
                         ["qwen2vl-100m/seed2.log exited 1"]),
        "llava-big": ([], ["no accuracy run finished"]),
    }))
    # a per-model compare report beside it is not a vlm_compare result
    _write(folder / "llava-100m.json", {"config": {}, "results": {"coat": [{"final_val_loss": 3.0}]}})
    lines = report.vlm_table(report.load_runs(folder))
    coat = _row_of(lines, "llava-100m | `coat`")
    # seeds, val loss, gap mean (per seed), target = one BF16 std in % (0.02 / 3.02), within, caption EM
    assert coat[2:8] == ["3", "3.0367 ± 0.0306", "+0.50% (+0.20, +0.40, +0.90)", "0.66%", "yes", "0.250"]
    # tok/s and ×, peak and ×, saved bytes ×: over the baseline of the same file and model
    assert coat[8:14] == ["40,000", "0.80×", "6.00", "0.60×", "0.300×", "0.500×"]
    assert coat[-4:] == ["2026-12-06", "`abc1234`", "NVIDIA H200", "`vlm/vlm_compare.json`"]
    base = _row_of(lines, "llava-100m | `bf16-torchopt` (baseline)")
    assert base[4] == "–" and base[6] == "–" and base[9] == "1.00×"
    qwen = _row_of(lines, "qwen2vl-100m | `coat`")
    assert qwen[4:7] == ["+0.70% (+0.60, +0.80)", "0.50%", "no"]
    assert qwen[8:14] == ["30,000", ANCHOR_MISSING, "–", "–", "0.400×", "0.440×"]
    text = "\n".join(lines)
    assert "llava-100m `coat`: gap +0.50% met (bound 0.66%), vision 0.300× met, LM 0.500× MISSED" in text
    assert "qwen2vl-100m `coat`: gap +0.70% MISSED (bound 0.50%), vision 0.400× met, LM 0.440× met" in text
    # a variant other than coat is a reference row: its gap is shown, no target is checked for it
    ref = _row_of(lines, "llava-100m | `fp8-linear-torchopt`")
    assert ref[4:7] == ["+6.00% (+5.00, +6.00, +7.00)", "0.66%", "–"] and ref[12:14] == ["1.200×", "1.100×"]
    assert "fp8-linear-torchopt`:" not in text
    assert "Reference rows (the targets are coat's, not theirs): llava-100m `fp8-linear-torchopt`." in text
    assert ("Problems the runs reported: `vlm/vlm_compare.json`, qwen2vl-100m: qwen2vl-100m/seed2.log exited 1; "
            "`vlm/vlm_compare.json`, llava-big: no accuracy run finished.") in text
    assert "- `vlm/vlm_compare.json`: `python -m benchmarks.vlm_compare --out $OUT`" in lines


def test_vlm_newest_file_per_model_and_variant_and_dry_runs(tmp_path):
    folder = tmp_path / "vlm"
    old = _vlm_file({"llava-100m": ([_vlm_row("bf16-torchopt", [3.0, 3.1], [0.0, 0.0], 100.0, 10, 10),
                                     _vlm_row("coat", [3.0, 3.1], [0.1, -0.1], 150.0, 4, 4)], ["seed1 cut"]),
                     "qwen2vl-100m": ([_vlm_row("bf16-torchopt", [2.0, 2.1], [0.0, 0.0], 100.0, 10, 10)],
                                      ["seed2 cut"])})
    old["meta"]["date"] = "2026-12-01 12:00 UTC"
    _write(folder / "vlm_compare-old.json", old)
    _write(folder / "vlm_compare-new.json", _vlm_file(
        {"llava-100m": ([_vlm_row("bf16-torchopt", [3.0, 3.1], [0.0, 0.0], 100.0, 10, 10),
                         _vlm_row("coat", [3.0, 3.1], [0.1, -0.1], 120.0, 4, 4)], [])}))
    lines = report.vlm_table(report.load_runs(folder))
    row = _row_of(lines, "llava-100m | `coat`")
    assert row[8:10] == ["120", "1.20×"] and row[-1] == "`vlm/vlm_compare-new.json`"
    # the old file's llava problem is superseded (its llava rows are not shown); its qwen2vl one still stands
    assert "Problems the runs reported: `vlm/vlm_compare-old.json`, qwen2vl-100m: seed2 cut." in lines

    dry = tmp_path / "dry" / "vlm"
    _write(dry / "vlm_compare.json", _vlm_file(
        {"tiny-llava": ([_vlm_row("bf16-torchopt", [5.1, 5.2], [0.0, 0.0], 6000.0, 10, 10),
                         _vlm_row("coat", [5.1, 5.2], [0.0, 0.1], 1000.0, 4, 3)], [])},
        command="python -m benchmarks.vlm_compare --dry-run --out /tmp/v", device="cpu"))
    with pytest.raises(ReportError, match="vlm_compare.json: a --dry-run result"):
        report.load_runs(dry)
    assert _row_of(report.vlm_table(report.load_runs(dry, dry_runs=True)), "tiny-llava | `coat`")[-2] == "none (CPU)"


@pytest.mark.parametrize("results, expect", [
    ({"llava-100m": []}, "results.llava-100m: expected an object with a \"rows\" list"),
    ({"llava-100m": {"rows": [{"label": "coat"}]}}, "results.llava-100m.rows[0]: expected an object with a"),
    ({"llava-100m": {"rows": [_vlm_row("coat", [1.0, 1.0], [0.0, 0.0], 1.0, 1, 1) | {"val_gap_pct": ["x"]}]}},
     "results.llava-100m.rows[0]: 'val_gap_pct' is ['x'], expected a list of numbers"),
    ({"llava-100m": {"rows": [_vlm_row("coat", [1.0, 1.0], [0.0, 0.0], 1.0, 1, 1) | {"tok_per_s": "fast"}]}},
     "results.llava-100m.rows[0]: 'tok_per_s' is 'fast', expected a number"),
])
def test_malformed_vlm_file_names_the_file(tmp_path, results, expect):
    bad = _write(tmp_path / "vlm" / "vlm_compare.json", {"meta": {}, "results": results})
    with pytest.raises(ReportError) as info:
        report.vlm_table(report.load_runs(tmp_path / "vlm"))
    assert str(bad) in str(info.value) and expect in str(info.value)


def test_repository_benchmarks_doc_is_up_to_date():
    """docs/benchmarks.md holds exactly the tables the committed result files give."""
    assert report.main(["--check"]) == 0
