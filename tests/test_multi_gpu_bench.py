"""benchmarks.multi_gpu on the CPU: the --dry-run end to end (torchrun launches of 2 gloo ranks, a simulated
out-of-memory error, fp8coat train for parity and the DCP resumes, the profile, the JSON and the table), and its
parts alone: stopping a launch's processes, loss comparisons, cloning a run folder, planned batches."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import llama7b, multi_gpu


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``python -m benchmarks.multi_gpu --dry-run`` (its result JSON and printed output)."""
    out, work = tmp_path_factory.mktemp("multi_gpu"), tmp_path_factory.mktemp("multi_gpu_work")
    env = {"FP8COAT_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in (*env, "TRITON_INTERPRET")}
    os.environ.update(env)
    os.environ.pop("TRITON_INTERPRET", None)  # the ranks run fp8coat's CPU path, as a user's dry run does
    try:
        cmd = [sys.executable, "-m", "benchmarks.multi_gpu", "--dry-run", "--out", str(out), "--work-dir", str(work)]
        done = subprocess.run(cmd, cwd=multi_gpu.REPO, env=multi_gpu.child_env(), capture_output=True, text=True,
                              timeout=600)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "multi_gpu.json").read_text()), done.stdout, out


@pytest.mark.slow
def test_dry_run_throughput_rows(dry_run):
    res, _, out = dry_run
    assert res["meta"]["command"].startswith("python -m benchmarks.multi_gpu --dry-run")
    assert {"date", "commit", "torch", "transformers", "gpu", "gpus"} <= set(res["meta"]) and res["meta"]["gpus"] == 2
    rows = {(r["variant"], r["batch"]): r for r in res["throughput"]}
    assert sorted(rows) == [("bf16", 2), ("coat", 2), ("coat", 4), ("coat_fp8_gather", 2)]
    assert "model4/torchao_fp8 (torchao float8 needs a CUDA GPU)" in res["skipped"]
    assert rows[("coat", 4)]["status"] == "oom" and rows[("coat", 4)]["tok_s_per_gpu"] is None
    for key in (("bf16", 2), ("coat", 2), ("coat_fp8_gather", 2)):
        r = rows[key]
        assert set(r) == set(multi_gpu.ROW_KEYS)
        assert (r["status"], r["gpus"], r["seq"], r["model"], r["compiled"]) == ("ok", 2, 32, "model4", False)
        assert r["tok_s_per_gpu"] == pytest.approx(r["batch"] * r["seq"] / r["step_ms"] * 1e3, rel=1e-3)
        assert math.isfinite(r["loss"]) and 3.0 < r["loss"] < 6.0  # ln(96) = 4.56 at random init
        assert (out / r["log"]).is_file()
    assert rows[("bf16", 2)]["optimizer"].startswith("torch.optim.AdamW") and not rows[("bf16", 2)]["chunked_loss"]
    assert rows[("coat", 2)]["optimizer"] == "fp8coat.AdamW" and rows[("coat", 2)]["chunked_loss"]
    assert not res["errors"], res["errors"]


@pytest.mark.slow
def test_dry_run_parity_and_dcp(dry_run):
    res, _, out = dry_run
    p = res["parity"]
    assert p["steps_compared"] == 10 and p["finite"] and p["within_tolerance"]
    for key in ("first_abs_diff", "max_abs_diff", "mean_abs_diff", "max_rel_diff"):
        assert math.isfinite(p[key]) and p[key] >= 0
    assert all(math.isfinite(v) for v in p["val_loss"].values())
    d = res["dcp"]
    assert d["save_step"] == 6 and set(d["resumed"]) == {"resume_2gpu", "resume_1gpu"}
    same = d["resumed"]["resume_2gpu"]
    assert same["steps"] == [7, 8, 9, 10] and same["exact"] and same["max_abs_diff"] == 0  # N -> N: bit for bit
    assert same["val_loss_diff"] == 0
    one = d["resumed"]["resume_1gpu"]
    assert one["steps"] == [7, 8, 9, 10] and one["finite"] and one["max_abs_diff"] < 1e-2
    for name in ("sharded", "single", "resume_2gpu", "resume_1gpu"):
        assert res["runs"][name]["status"] == "ok"
        assert (out / "runs" / f"{name}.metrics.jsonl").is_file()


@pytest.mark.slow
def test_dry_run_scaling_and_table(dry_run):
    res, stdout, _ = dry_run
    s = res["scaling"]
    assert [(r["gpus"], r["status"]) for r in s["rows"]] == [(1, "ok"), (2, "ok")] and s["efficiency"] > 0
    assert set(s["profile"]["categories_ms"]) == set(llama7b.CATEGORIES) and s["profile"]["gpus"] == 2
    assert s["profile"]["categories_ms"]["collectives"] > 0  # gloo's collectives, on the CPU
    for heading in ("| model | variant | GPUs | batch per GPU |", "2 (4 OOM)", "parity: 2 GPUs vs 1 GPU",
                    "| resume_2gpu | ok | 4 | 0.00e+00 | True |", "scaling: coat on model4", "| collectives |"):
        assert heading in stdout, heading


def test_launch_stops_every_process_of_a_launch(tmp_path):
    """A launch past its time limit is stopped with the processes it started, also those in a session of their
    own (as torchrun starts its workers)."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(300)'], start_new_session=True); open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(300)")
    t0 = time.time()
    run = multi_gpu.launch([sys.executable, "-c", code, str(pid_file)], str(tmp_path / "log.txt"), timeout_s=3)
    assert run["timed_out"] and time.time() - t0 < 60
    child = int(pid_file.read_text())
    for _ in range(50):
        if not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {child} still runs")
    assert (tmp_path / "log.txt").read_text().startswith("$ ")


def test_compare_losses_and_tolerance():
    ref = {1: 10.0, 2: 8.0, 3: 6.0}
    same = multi_gpu.compare_losses(dict(ref), ref)
    assert same["exact"] and same["max_abs_diff"] == 0 and multi_gpu.within_tolerance(same)
    near = multi_gpu.compare_losses({1: 10.001, 2: 8.02, 3: 6.0}, ref)
    assert near["first_abs_diff"] == pytest.approx(1e-3) and near["max_rel_diff"] == pytest.approx(0.02 / 8)
    assert not near["exact"] and multi_gpu.within_tolerance(near)
    assert not multi_gpu.within_tolerance(multi_gpu.compare_losses({1: 10.1, 2: 8.0, 3: 6.0}, ref))  # step 1
    after = multi_gpu.compare_losses({1: 0.0, 2: 8.0, 3: 6.5}, ref, after_step=1)
    assert after["steps"] == [2, 3] and after["max_abs_diff"] == 0.5
    nan = multi_gpu.compare_losses({1: float("nan"), 2: 8.0, 3: 6.0}, ref)
    assert not nan["finite"] and not multi_gpu.within_tolerance(nan)
    assert not multi_gpu.within_tolerance(multi_gpu.compare_losses({}, ref))


def test_clone_run_links_checkpoints_and_copies_the_rest(tmp_path):
    src = tmp_path / "run"
    for step in (4, 8):
        (src / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (src / "checkpoints" / f"step_{step:06d}" / "weights").write_text(str(step))
    (src / "metrics.jsonl").write_text("{}\n")
    (src / "summary.json").write_text("{}")
    multi_gpu.clone_run(str(src), str(tmp_path / "copy"), 4)
    copy = tmp_path / "copy"
    assert os.listdir(copy / "checkpoints") == ["step_000004"] and not (copy / "summary.json").exists()
    assert os.path.samefile(copy / "checkpoints" / "step_000004" / "weights",
                            src / "checkpoints" / "step_000004" / "weights")
    assert not os.path.samefile(copy / "metrics.jsonl", src / "metrics.jsonl")


def test_planned_batches_fit_and_the_next_does_not():
    for variant in ("bf16", "coat", "torchao_fp8"):
        config = multi_gpu.model_config("llama7b", False)
        best = multi_gpu.planned_max_batch(config, variant, 2, 2048, True, 0.95 * 140.4)
        assert best >= 1
        assert multi_gpu.planned_peak_gib(config, variant, best, 2, 2048, True) <= 0.95 * 140.4
        assert multi_gpu.planned_peak_gib(config, variant, best + 1, 2, 2048, True) > 0.95 * 140.4
    # the torchao estimate reproduces the one-GPU runs it comes from (94.21 and 108.26 GiB)
    config = multi_gpu.model_config("llama7b", False)
    assert multi_gpu.torchao_estimate_gib(config, 8, 1, 2048) == pytest.approx(94.21, rel=5e-3)
    assert multi_gpu.torchao_estimate_gib(config, 10, 1, 2048) == pytest.approx(108.26, rel=5e-3)


def test_parse_batches():
    got = multi_gpu.parse_batches(["llama7b/coat:24,16;model4/bf16:8"], multi_gpu.MODEL_NAMES, multi_gpu.VARIANTS)
    assert got == {("llama7b", "coat"): [16, 24], ("model4", "bf16"): [8]}
    with pytest.raises(SystemExit, match="MODEL/VARIANT"):
        multi_gpu.parse_batches(["coat:8"], multi_gpu.MODEL_NAMES, multi_gpu.VARIANTS)
