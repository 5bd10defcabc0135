"""`fp8coat train` never gives silently wrong results: a resume restores its run's configuration and refuses
conflicting flags, runs never mix, diverged or damaged checkpoints are never written or loaded, old checkpoints
are pruned only after a new one is complete, a run killed while saving resumes bit-identically, the command line
rejects bad values with clear errors, a resume trains on the run's own data with its own tokenizer and loads only
the checkpoint's own weight files (a fine-tuning run needs no more than its checkpoint), steps with non-finite
gradients are reported, and hand-damaged run files are named."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fp8coat.train.cli import build_parser, main
from fp8coat.train.progress import MetricsLog

pytest.importorskip("transformers")

FAST = ["--model", "tiny", "--tokenizer", "bytes", "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
        "--eval-batches", "2", "--warmup-steps", "2", "--recipe", "coat", "--master-weights", "bf16-stochastic",
        "--eval-every", "0"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(out, *args) -> int:
    torch.set_num_threads(2)
    return main(["train", "--out-dir", str(out), *args])


def _losses(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in MetricsLog.read(out / "metrics.jsonl")]


def _checkpoints(out) -> list[str]:
    return sorted(os.listdir(out / "checkpoints"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _train(out, "--steps", "6", "--save-every", "2", *FAST) == 0
    return out


def _interrupted_copy(reference, dest, newest: str = "step_000006"):
    """``reference`` as if killed after its checkpoint before ``newest``: ``newest`` and the summary gone."""
    shutil.copytree(reference, dest)
    shutil.rmtree(dest / "checkpoints" / newest)
    os.remove(dest / "summary.json")
    return dest


# --- A: --resume restores the run's configuration -------------------------------------------------------------

def test_resume_restores_the_saved_configuration(tmp_path, capsys):
    """Flags not repeated on --resume come from the run, not from the defaults: the resumed run equals the
    uninterrupted one, and config.json keeps the run's values."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--steps", "4", "--save-every", "2", "--no-expansion", "--lr", "1e-2", *FAST]
    assert _train(full, *args) == 0
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_000004")
    saved = json.loads((part / "config.json").read_text())
    assert _train(part, "--resume", "--tokenizer", "bytes", "--steps", "4") == 0  # the rest from the run
    assert json.loads((part / "config.json").read_text()) == saved | {"out_dir": str(part)}
    assert _losses(part) == _losses(full)
    assert "resuming at step 2" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,saved", [
    (["--batch-size", "8"], "8", "4"),
    (["--optimizer", "torch"], "torch", "fp8coat"),
    (["--no-expansion"], "False", "True"),
    (["--master-weights", "fp32"], "fp32", "bf16-stochastic"),
    (["--seq-len", "64"], "64", "32"),
])
def test_resume_rejects_flags_that_differ_from_the_run(tmp_path, capsys, flag, value, saved):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2", *FAST) == 0
    before = {p: (out / p).read_bytes() for p in ("config.json", "metrics.jsonl", "summary.json")}
    capsys.readouterr()
    assert _train(out, "--resume", "--steps", "3", "--tokenizer", "bytes", *flag) == 2
    err = capsys.readouterr().err
    name = flag[0].replace("--no-", "--")
    assert f"{name} {value}" in err and f"the run has {saved}" in err, err
    assert {p: (out / p).read_bytes() for p in before} == before  # nothing changed
    assert _checkpoints(out) == ["step_000002"]


def test_resume_of_a_bf16_run_that_recorded_the_fp8_weight_cache_on(tmp_path):
    """Runs written while the FP8 weight cache was on by default recorded it on, bf16 ones too (where it meant
    nothing): such a run resumes, and --cache-fp8-weights with bf16 is still refused."""
    out = tmp_path / "run"
    bf16 = [{"coat": "bf16", "bf16-stochastic": "auto"}.get(a, a) for a in FAST]
    assert _train(out, "--steps", "2", *bf16) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"] == "bf16" and cfg["cache_fp8_weights"] is False
    (out / "config.json").write_text(json.dumps(cfg | {"cache_fp8_weights": True}))
    assert _train(out, "--resume", "--steps", "3", "--tokenizer", "bytes", "--cache-fp8-weights") == 2
    assert _train(out, "--resume", "--steps", "3", "--tokenizer", "bytes") == 0
    assert json.loads((out / "config.json").read_text())["cache_fp8_weights"] is False
    assert _checkpoints(out) == ["step_000002", "step_000003"]


def test_resume_may_extend_the_run(tmp_path):
    """--steps may grow on --resume (the cosine decay is recomputed over the new total); config.json records it;
    --steps below the checkpoint's step is an error."""
    from fp8coat.train.schedule import lr_at

    out = tmp_path / "run"
    assert _train(out, "--steps", "3", *FAST) == 0
    assert _train(out, "--resume", "--tokenizer", "bytes", "--steps", "5", "--log-every", "2") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 5 and cfg["log_every"] == 2 and cfg["batch_size"] == 4
    log = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert log[-1]["lr"] == lr_at(4, lr=3e-3, steps=5, warmup_steps=2, min_lr_ratio=0.1)
    assert _checkpoints(out) == ["step_000003", "step_000005"]


def test_resume_below_the_checkpoint_step_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "3", *FAST) == 0
    capsys.readouterr()
    assert _train(out, "--resume", "--tokenizer", "bytes", "--steps", "2") == 2
    assert "--steps 2 is below the step of the checkpoint" in capsys.readouterr().err


# --- B: runs never mix -------------------------------------------------------------------------------------------

def test_new_run_refuses_a_used_out_dir_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "4", "--save-every", "2", *FAST) == 0
    capsys.readouterr()
    assert _train(out, "--steps", "2", *FAST) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _checkpoints(out) == ["step_000002", "step_000004"]
    assert _train(out, "--steps", "2", "--overwrite", *FAST) == 0  # the old run's files are cleared first
    assert _checkpoints(out) == ["step_000002"]
    assert [r["step"] for r in MetricsLog.read(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "config.json").read_text())["steps"] == 2


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    args = ["--steps", "4", "--save-every", "2", *FAST]
    assert _train(run, *args) == 0
    assert _train(other, *args) == 0
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if interrupted after step 2 ...
    shutil.copytree(other / "checkpoints" / "step_000004", run / "checkpoints" / "step_000004")  # ... plus a stray
    capsys.readouterr()
    assert _train(run, "--resume", *args) == 2
    err = capsys.readouterr().err
    assert "step_000004 belongs to another run" in err, err


def test_resuming_a_finished_run_keeps_or_recomputes_its_summary(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", "4", "--save-every", "2", *FAST]
    assert _train(out, *args) == 0
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    assert _train(out, "--resume", *args) == 0
    assert "already finished at step 4 of 4" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == summary
    os.remove(out / "summary.json")  # e.g. killed between the last checkpoint and the summary
    assert _train(out, "--resume", *args) == 0
    again = json.loads((out / "summary.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "steps", "params"):
        assert again[key] == json.loads(summary)[key], key


# --- C: a diverged run writes no checkpoint of it, a resume refuses one ------------------------------------------

def test_diverged_run_stops_before_saving_non_finite_weights(tmp_path, capsys):
    """The loss is checked on every step without a host sync (a device-side tracker read at log and save time):
    with --save-every 1 and rare logs, no checkpoint holds the diverged weights."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _train(out, "--steps", "8", "--save-every", "1", "--lr", "1e30", *FAST, "--log-every", "100") == 1
    err = capsys.readouterr().err
    match = re.search(r"non-finite at step (\d+)", err)
    assert match, err
    first_bad = int(match.group(1))
    for name in _checkpoints(out):
        assert int(name.split("_")[1]) < first_bad
        weights = load_file(str(out / "checkpoints" / name / "model.safetensors"))
        assert all(torch.isfinite(w.float()).all() for w in weights.values()), name


def test_non_finite_tensor_finder_names_weights_and_optimizer_state():
    import fp8coat
    from fp8coat.train.finite import first_non_finite

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(torch.bfloat16)
    optimizer = fp8coat.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64, dtype=torch.bfloat16)).float().square().mean().backward()
    optimizer.step()
    assert first_non_finite(model, optimizer) is None
    with torch.no_grad():
        model[1].bias[3] = float("inf")
    assert first_non_finite(model, optimizer) == "1.bias"
    with torch.no_grad():
        model[1].bias[3] = 0
    state = optimizer.state[model[0].weight]
    fp8 = next(k for k, v in state.items() if v.dtype == torch.float8_e4m3fn)
    state[fp8].view(torch.uint8)[0, 0] = 0x7F  # the E4M3 NaN code
    assert first_non_finite(model, optimizer) == f"optimizer state {fp8!r} of 0.weight"


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from fp8coat.train.checkpoint import write_manifest

    out = tmp_path / "run"
    assert _train(out, "--steps", "2", "--save-every", "1", *FAST) == 0
    ckpt = out / "checkpoints" / "step_000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(str(ckpt))  # an intact file holding a NaN, as an older fp8coat could write
    capsys.readouterr()
    assert _train(out, "--resume", "--tokenizer", "bytes", "--steps", "3") == 2
    err = capsys.readouterr().err
    assert "step_000002 holds non-finite values (model.norm.weight)" in err, err


# --- D: damaged checkpoints ---------------------------------------------------------------------------------------

def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip one bit of the last byte (tensor data in a safetensors file) or of the middle one
        i = len(data) - 1 if path.suffix == ".safetensors" else len(data) // 2
        data[i] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,how", [("model.safetensors", "truncate"), ("model.safetensors", "flip"),
                                      ("optimizer.pt", "truncate"), ("optimizer.pt", "flip"),
                                      ("state.json", "truncate")])
def test_resume_skips_a_damaged_checkpoint_and_says_so(reference, tmp_path, capsys, name, how):
    run = _interrupted_copy(reference, tmp_path / "run")
    _damage(run / "checkpoints" / "step_000004" / name, how)
    capsys.readouterr()
    assert _train(run, "--resume") == 0
    captured = capsys.readouterr()
    assert re.search(rf"skipping damaged checkpoint \S*step_000004: \S*{re.escape(name)}", captured.err), \
        captured.err
    assert "resuming at step 2" in captured.out
    assert _losses(run) == _losses(reference)  # the skipped steps recomputed exactly


def test_resume_with_every_checkpoint_damaged_names_the_files(reference, tmp_path, capsys):
    run = _interrupted_copy(reference, tmp_path / "run")
    _damage(run / "checkpoints" / "step_000004" / "optimizer.pt", "truncate")
    _damage(run / "checkpoints" / "step_000002" / "model.safetensors", "flip")
    capsys.readouterr()
    assert _train(run, "--resume") == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step_000004/optimizer.pt" in err, err
    assert "step_000002/model.safetensors" in err, err


def test_manifest_lists_every_file_of_a_checkpoint(reference):
    import hashlib

    ckpt = reference / "checkpoints" / "step_000004"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert set(files) == set(os.listdir(ckpt)) - {"manifest.json"}
    for name, entry in files.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_checkpoint_without_manifest_loads_with_a_warning(reference, tmp_path, capsys):
    run = _interrupted_copy(reference, tmp_path / "run")
    os.remove(run / "checkpoints" / "step_000004" / "manifest.json")  # the older format
    capsys.readouterr()
    assert _train(run, "--resume") == 0
    assert "has no manifest.json" in capsys.readouterr().err
    assert _losses(run) == _losses(reference)


@pytest.mark.parametrize("name,code", [("model.safetensors", 2), ("optimizer.pt", 2), ("state.json", 0)])
def test_truncated_file_of_a_checkpoint_without_manifest_is_named(reference, tmp_path, capsys, name, code):
    """Without a manifest, a damaged state.json is found before loading (the checkpoint is skipped); damaged
    weights or optimizer state only while loading: a clear error naming the file."""
    run = _interrupted_copy(reference, tmp_path / "run")
    for step in ("step_000002", "step_000004"):
        os.remove(run / "checkpoints" / step / "manifest.json")
    _damage(run / "checkpoints" / "step_000004" / name, "truncate")
    capsys.readouterr()
    assert _train(run, "--resume", "--tokenizer", "bytes", "--steps", "6") == code
    err = capsys.readouterr().err
    assert f"step_000004/{name} is unreadable" in err, err


def test_finetuning_from_a_damaged_checkpoint_names_the_file(reference, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference / "checkpoints" / "step_000006", ckpt)
    _damage(ckpt / "model.safetensors", "flip")
    assert _train(tmp_path / "ft", "--model", str(ckpt), *FAST[2:], "--steps", "1") == 2
    assert f"{ckpt}/model.safetensors differs from the manifest" in capsys.readouterr().err


def test_metrics_log_drops_a_half_written_last_line(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a partial line; the resume drops it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    MetricsLog(str(path), truncate_after_step=2).close()
    assert [r["step"] for r in MetricsLog.read(str(path))] == [1, 2]


# --- E: --keep-last -------------------------------------------------------------------------------------------------

def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--steps", "5", "--save-every", "1", "--keep-last", "2", *FAST) == 0
    assert _checkpoints(out) == ["step_000004", "step_000005"]


# --- F: clear errors and readable output --------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device,message", [("cuda", "--device cuda: no CUDA GPU is available"),
                                            ("cuda:1", "--device cuda:1: no CUDA GPU is available"),
                                            ("tpu", "unknown --device 'tpu'")])
def test_unavailable_device_is_a_clear_error(tmp_path, capsys, device, message):
    out = tmp_path / "run"
    assert _train(out, "--steps", "1", *FAST, "--device", device) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_every_train_flag_has_help_text():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"]
    missing = [a.option_strings[0] for a in train._actions if a.option_strings and a.dest != "help"
               and not re.sub(r"\(default: [^)]*\)", "", a.help or "").strip()]
    assert missing == []


def test_human_counts():
    from fp8coat.train.progress import human_count

    assert [human_count(n) for n in (0, 7, 850, 999.6, 3210, 48_100, 4_912_345, 2.5e9)] == \
        ["0", "7", "850", "1.0k", "3.2k", "48.1k", "4.9M", "2.5B"]


def test_small_run_prints_readable_counts_and_summary(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i} of a small text to train on.\n" for i in range(200)))
    out = tmp_path / "run"
    assert _train(out, "--steps", "3", "--data", str(text), *FAST) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0]
    assert re.search(r"\(\d\.\dk train tokens\)", header), header
    assert re.search(r"\| \d+(\.\d)?k? tok/s \|", captured.err), captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert "{'" not in captured.out
    assert re.search(rf"validation loss\s+{summary['final_val_loss']:.4f}", captured.out), captured.out
    assert re.search(rf"train loss \(mean of last 3 steps\)\s+{summary['final_train_loss']:.4f}", captured.out)
    assert "tok/s" in captured.out and "optimizer state" in captured.out


def test_eta_after_resume_counts_only_the_steps_since_the_resume(monkeypatch):
    from fp8coat.train import progress

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    stream = io.StringIO()
    bar = progress.Progress(100, "x", stream=stream, start=90)
    bar.update(91, loss=1.0)  # 10 s for one step, 9 to go
    assert stream.getvalue().rstrip().endswith("eta 1m30s"), stream.getvalue()


# --- G: a run killed while saving resumes bit-identically --------------------------------------------------------

def _spawn(out, args, hang: str, log):
    env = {**os.environ, "FP8COAT_TEST_SAVE_HANG": hang}
    return subprocess.Popen([sys.executable, "-m", "fp8coat", "train", "--out-dir", str(out), *args], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill_when(proc, path, log_path, timeout=240.0):
    deadline = time.time() + timeout
    try:
        while not path.exists():
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.time() < deadline, f"{path} never appeared:\n{log_path.read_text()}"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_run_killed_while_saving_resumes_bit_identically(tmp_path):
    """SIGKILL inside three saves (a partial checkpoint with only the weights; a partial one complete up to its
    manifest; the final one renamed but old ones not yet pruned and no summary yet): each resume continues from
    the last complete checkpoint, and the run ends bit-identical (losses, grad norms, summary) to an uninterrupted
    one. With --keep-last 1 the previous checkpoint survives until the new one is complete."""
    args = [*FAST, "--steps", "8", "--save-every", "2", "--keep-last", "1", "--device", "cpu"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fp8coat", "train", "--out-dir", str(ref), *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    ckpts = run / "checkpoints"
    points = [("4:model.safetensors", args, ckpts / "step_000004.partial" / "model.safetensors"),
              ("6:manifest.json", ["--resume"], ckpts / "step_000006.partial" / "manifest.json"),
              ("8:complete", ["--resume"], ckpts / "step_000008" / "manifest.json")]
    for i, (hang, cli_args, marker) in enumerate(points):
        log_path = tmp_path / f"log{i}.txt"
        with open(log_path, "w") as log:
            _kill_when(_spawn(run, cli_args, hang, log), marker, log_path)
        complete = [d for d in os.listdir(ckpts) if d.startswith("step_") and "." not in d]
        assert complete, os.listdir(ckpts)  # never left without a complete checkpoint
    assert not (run / "summary.json").exists()
    assert _train(run, "--resume") == 0  # finished at step 8: the summary is recomputed
    assert _losses(run) == _losses(ref)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert (a["final_train_loss"], a["final_val_loss"]) == (b["final_train_loss"], b["final_val_loss"])
    assert _checkpoints(run) == ["step_000008"]


# --- H: a resume trains on the data and with the tokenizer the run started with ----------------------------------

def _write_texts(folder, names) -> None:
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_text("".join(f"Document {name}, line {j}: the {i * 7 + j}th line of plain words.\n"
                                           for j in range(60)))


def test_resume_uses_the_checkpoints_tokenizer_and_refuses_other_data(tmp_path, monkeypatch, capsys):
    """With --tokenizer bpe, a resume encodes the data with the checkpoint's tokenizer.json, not with whatever the
    BPE cache now holds (here: another tokenizer under the same cache key): the run ends bit-identical. Data
    that differs from the data the run started with (a file added) is refused, naming what changed, before
    anything is written."""
    from fp8coat.train.data import train_tokenizer

    monkeypatch.setenv("FP8COAT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "texts"
    _write_texts(data, ["a.txt", "b.txt", "c.txt", "d.txt"])
    args = ["--tokenizer", "bpe", "--vocab-size", "300", "--data", str(data), *FAST[4:]]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, "--steps", "4", "--save-every", "2", *args) == 0
    _interrupted_copy(full, part, newest="step_000004")
    other = train_tokenizer([file.read_text().upper() for file in sorted(data.iterdir())], 300)  # other merges
    assert other.get_vocab_size() == 300
    for cached in (tmp_path / "cache" / "tokenizers").iterdir():
        other.save(str(cached))
    shutil.rmtree(tmp_path / "cache" / "datasets")
    assert _train(part, "--resume", "--steps", "4") == 0
    assert _losses(part) == _losses(full)
    ckpts = part / "checkpoints"
    tokenizers = [(ckpts / step / "tokenizer.json").read_bytes() for step in ("step_000002", "step_000004")]
    assert tokenizers[0] == tokenizers[1]

    _write_texts(data, ["e.txt"])
    before = {p: (part / p).read_bytes() for p in ("config.json", "metrics.jsonl", "summary.json")}
    capsys.readouterr()
    assert _train(part, "--resume", "--steps", "6") == 2
    err = capsys.readouterr().err
    assert "the training data is not the data the run started with" in err and "training tokens" in err, err
    assert {p: (part / p).read_bytes() for p in before} == before


def test_resume_of_a_run_without_a_data_record_warns(reference, tmp_path, capsys):
    from fp8coat.train.checkpoint import write_manifest

    run = _interrupted_copy(reference, tmp_path / "run")
    for file in (run / "config.json", run / "checkpoints" / "step_000004" / "state.json"):
        content = json.loads(file.read_text())
        del content["data_identity"]
        file.write_text(json.dumps(content))
    write_manifest(str(run / "checkpoints" / "step_000004"))
    capsys.readouterr()
    assert _train(run, "--resume") == 0
    assert "records no identity of its training data" in capsys.readouterr().err
    assert _losses(run) == _losses(reference)
    assert json.loads((run / "config.json").read_text())["data_identity"]["train_tokens"] > 0  # recorded now


# --- I: only the checkpoint's own weight files are loaded ---------------------------------------------------------

def test_an_extra_safetensors_file_in_a_checkpoint_is_not_loaded(reference, tmp_path):
    run = _interrupted_copy(reference, tmp_path / "run")
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "step_000002" / "model.safetensors", ckpts / "step_000004" / "old_weights.safetensors")
    assert _train(run, "--resume") == 0
    assert _losses(run) == _losses(reference)


def test_sharded_checkpoint_loads_the_shards_its_index_names(tmp_path):
    """The shards named by model.safetensors.index.json are the weights (another *.safetensors file is not); with
    a manifest, a weight file it does not list is an error naming the file."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp8coat.train import checkpoint

    def tiny(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=64))

    saved, ckpt = tiny(0), tmp_path / "ckpt"
    saved.save_pretrained(ckpt, max_shard_size="20KB")
    torch.save(torch.optim.AdamW(saved.parameters()).state_dict(), ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 1}))
    save_file({k: torch.zeros_like(v) for k, v in saved.state_dict().items()}, str(ckpt / "zzz.safetensors"))
    loaded = tiny(1)
    checkpoint.load_checkpoint(str(ckpt), loaded, torch.optim.AdamW(loaded.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))
    shards = checkpoint.model_files(str(ckpt))
    assert len(shards) > 1 and all(s.startswith("model-0") for s in shards)
    checkpoint.write_manifest(str(ckpt))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][shards[0]]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"{shards[0]} is not listed in"):
        checkpoint.model_files(str(ckpt))


# --- J: steps with non-finite gradients are reported -------------------------------------------------------------

def _poison_gradient_at(monkeypatch, *steps: int) -> None:
    """From now on, the training forwards numbered ``steps`` (from 1) get a term of value 0 whose gradient is NaN in
    one element (of the first parameter): the loss stays finite."""
    from fp8coat.train import loop

    original, calls = loop._loss, []

    def poisoned(model, ids, autocast, head=None):
        loss = original(model, ids, autocast, head)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) in steps:
                w = next(model.parameters()).reshape(-1)[0].float()
                loss = loss + 0.0 * torch.sqrt(w - w.detach())  # sqrt'(0) = inf, times 0: a NaN gradient
        return loss

    monkeypatch.setattr(loop, "_loss", poisoned)


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_steps_with_non_finite_gradients_are_counted(tmp_path, monkeypatch, capsys, clip):
    """fp8coat.AdamW skips NaN gradient elements. With clipping, a NaN norm makes every gradient NaN (the whole
    step is skipped); without, only the NaN element is skipped. Either way the metrics log (counts so far in the
    run), the progress line, the summary and summary.json report it, and a resume keeps the counts."""
    _poison_gradient_at(monkeypatch, 2)
    full = tmp_path / "full"
    args = ["--steps", "4", "--save-every", "2", "--grad-clip", clip, *FAST]
    assert _train(full, *args) == 0
    captured = capsys.readouterr()
    log = MetricsLog.read(full / "metrics.jsonl")
    summary = json.loads((full / "summary.json").read_text())
    elements = summary["params"] if clip != "0" else 1
    assert [r["nonfinite_grad_steps"] for r in log] == [0, 1, 1, 1]
    assert [r["nonfinite_grad_elements"] for r in log] == [0, elements, elements, elements]
    assert (summary["nonfinite_grad_steps"], summary["nonfinite_grad_elements"]) == (1, elements)
    assert "1 step with non-finite gradients" in captured.err
    assert re.search(r"non-finite gradients\s+1 step with non-finite gradients", captured.out), captured.out
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step_000004")
    assert _train(run, "--resume") == 0
    assert MetricsLog.read(run / "metrics.jsonl")[-1]["nonfinite_grad_elements"] == elements
    assert json.loads((run / "summary.json").read_text())["nonfinite_grad_steps"] == 1


def test_non_finite_gradients_with_torchs_adamw_stop_the_run_as_diverged(tmp_path, monkeypatch, capsys):
    _poison_gradient_at(monkeypatch, 2)
    out = tmp_path / "run"
    assert _train(out, "--steps", "4", *FAST, "--optimizer", "torch", "--master-weights", "auto") == 1
    assert "non-finite at step 3" in capsys.readouterr().err
    assert MetricsLog.read(out / "metrics.jsonl")[1]["nonfinite_grad_steps"] == 1


@pytest.mark.parametrize("limit, poisoned, stops", [
    (3, (2, 3, 4, 5, 6, 7, 8), True),  # stuck from step 2 on: stopped at step 4
    (0, (2, 3, 4, 5, 6, 7, 8), False),  # 0: never stop
    (3, (2, 3, 5, 6, 8), False),  # never 3 in a row
])
def test_a_run_whose_gradients_stay_non_finite_stops(tmp_path, monkeypatch, capsys, limit, poisoned, stops):
    """Consecutive skipped steps (the weights no longer change) stop the run once --max-nonfinite-streak of them
    have passed, with an error naming the steps and no checkpoint after them; isolated ones do not."""
    _poison_gradient_at(monkeypatch, *poisoned)
    out = tmp_path / "run"
    rc = _train(out, "--steps", "8", "--save-every", "1", "--max-nonfinite-streak", str(limit), *FAST)
    err = capsys.readouterr().err
    log = MetricsLog.read(out / "metrics.jsonl")
    if stops:
        assert rc == 1
        assert "the gradient norm was NaN or inf in 3 consecutive steps (2 to 4)" in err
        assert [r["step"] for r in log] == [1, 2, 3]  # the sync at step 4's record found it
        assert sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002", "step_000003"]
        assert "the newest checkpoint is" in err and "step_000003" in err
    else:
        assert rc == 0, err
        assert log[-1]["nonfinite_grad_steps"] == len(poisoned)
        streaks, streak = [], 0
        for step in range(1, 9):
            streak = streak + 1 if step in poisoned else 0
            streaks.append(streak)
        assert [r["nonfinite_grad_streak"] for r in log] == streaks


# --- K: hand-damaged run files give clear errors --------------------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    ('"0.003"', 'config.json: \'lr\' is "0.003", expected a number'),
    ("0.5", "lr 0.5 in the run, 0.003 in the checkpoint"),
])
def test_changed_config_json_is_named_on_resume(reference, tmp_path, capsys, value, message):
    run = _interrupted_copy(reference, tmp_path / "run")
    config = run / "config.json"
    config.write_text(config.read_text().replace('"lr": 0.003', f'"lr": {value}'))
    capsys.readouterr()
    assert _train(run, "--resume") == 2
    err = capsys.readouterr().err
    assert message in err and "--lr" not in err, err


def test_damaged_metrics_lines_after_the_checkpoint_are_dropped(reference, tmp_path):
    run = _interrupted_copy(reference, tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": "x"}\n\xff\xfe junk\n')
    assert _train(run, "--resume") == 0
    assert _losses(run) == _losses(reference)


@pytest.mark.parametrize("line", [b"\xff\xfe junk", b'{"step": "x"}', b"[1, 2]"])
def test_damaged_metrics_line_before_the_checkpoint_is_named(reference, tmp_path, capsys, line):
    run = _interrupted_copy(reference, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = line + b"\n"
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    config = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert _train(run, "--resume") == 2
    assert f"{run}/metrics.jsonl line 2 is damaged" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == b"".join(lines) and (run / "config.json").read_bytes() == config


# --- L: a fine-tuning run resumes without the checkpoint it started from -------------------------------------------

def test_finetune_run_resumes_after_its_source_checkpoint_is_gone(reference, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(reference / "checkpoints" / "step_000006", source)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, "--model", str(source), *FAST[2:], "--steps", "4", "--save-every", "2") == 0
    _interrupted_copy(full, part, newest="step_000004")
    shutil.rmtree(source)
    assert _train(part, "--resume") == 0
    assert _losses(part) == _losses(full)
