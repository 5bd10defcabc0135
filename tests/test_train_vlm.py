"""`fp8coat train` / `fp8coat compare` on vision-language models (tiny presets, synthetic scenes, CPU): files,
summary keys, exact resume with the checkpoint's processor, fine-tuning a checkpoint, options, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fp8coat.train.cli import main
from fp8coat.train.data.image_sources import image_source_folder
from fp8coat.train.progress import MetricsLog

pytest.importorskip("transformers")

COMMON = ["--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--eval-batches", "1", "--warmup-steps", "1",
          "--caption-eval", "2", "--device", "cpu"]
DATA = ["--data", "synthetic:24"]


def _run(args) -> int:
    torch.set_num_threads(2)
    return main(args)


def _losses(out) -> list[float]:
    return [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")]


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2vl"])
def test_train_writes_run_and_resumes_exactly(tmp_path, preset):
    """4 steps with checkpoints at 2 and 4; resuming a copy of the run from step 2 (the checkpoint's processor)
    gives steps 3 and 4 the same losses, bit for bit, and the same final weights."""
    out = tmp_path / "run"
    assert _run(["train", "--model", preset, *DATA, "--out-dir", str(out), "--steps", "4", "--save-every", "2",
                 "--eval-every", "2", *COMMON]) == 0
    ckpt = out / "checkpoints" / "step_000004"
    files = set(os.listdir(ckpt))
    assert {"config.json", "model.safetensors", "optimizer.pt", "state.json", "manifest.json", "tokenizer.json",
            "chat_template.jinja"} <= files
    assert "processor_config.json" in files or "preprocessor_config.json" in files
    log = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] > 0 and summary["optimizer_state_bytes"] > 0
    assert summary["saved_vision_bytes"] > 0 and summary["saved_lm_bytes"] > 0
    assert summary["saved_activation_bytes"] == summary["saved_vision_bytes"] + summary["saved_lm_bytes"]
    assert 0.0 <= summary["caption_exact_match"] <= 1.0
    identity = json.loads((out / "config.json").read_text())["data_identity"]
    assert identity["train_records"] + identity["val_records"] == 24 and identity["source"].startswith("synthetic")

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000004")
    assert _run(["train", "--out-dir", str(copy), "--resume"]) == 0
    assert _losses(copy) == _losses(out)
    from safetensors.torch import load_file

    a = load_file(out / "checkpoints" / "step_000004" / "model.safetensors")
    b = load_file(copy / "checkpoints" / "step_000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_from_a_checkpoint_reuses_its_processor(tmp_path):
    out = tmp_path / "base"
    assert _run(["train", "--model", "tiny-llava", *DATA, "--out-dir", str(out), "--steps", "1", *COMMON]) == 0
    ckpt = out / "checkpoints" / "step_000001"
    tuned = tmp_path / "tuned"
    assert _run(["train", "--model", str(ckpt), *DATA, "--out-dir", str(tuned), "--steps", "1",
                 "--tokenizer", "bytes", *COMMON]) == 0  # the checkpoint's tokenizer wins over --tokenizer
    base_id = json.loads((out / "config.json").read_text())["data_identity"]
    tuned_id = json.loads((tuned / "config.json").read_text())["data_identity"]
    assert tuned_id["tokenizer"] == base_id["tokenizer"]
    first = MetricsLog.read(tuned / "metrics.jsonl")[0]["loss"]
    assert first < MetricsLog.read(out / "metrics.jsonl")[0]["loss"]  # it starts from the trained weights


def test_resume_refuses_changed_records(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_source_folder("synthetic:24"), data)
    out = tmp_path / "run"
    assert _run(["train", "--model", "tiny-llava", "--data", str(data), "--out-dir", str(out), "--steps", "2",
                 "--save-every", "1", *COMMON]) == 0
    shutil.rmtree(out / "checkpoints" / "step_000002")
    lines = (data / "data.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["text"] = record["text"] + " again"
    (data / "data.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="not the data the run started with.*records' sha256"):
        from fp8coat.train import train
        from fp8coat.train.config import TrainConfig

        saved = json.loads((out / "config.json").read_text())
        train(TrainConfig.from_dict(saved), resume=True, quiet=True)


def test_options_activation_checkpointing_accumulation_and_step_in_backward(tmp_path):
    """--activation-checkpointing gives the same losses and keeps less for backward; gradient accumulation trains
    (finite, decreasing losses). (--step-in-backward and --no-chunked-loss go through the same loss and step code;
    under the Triton interpreter of the test suite they cost ~10 s a step, so they are not run here.)"""
    runs = {}
    for name, flags in {"plain": [], "ckpt": ["--activation-checkpointing"], "accum": ["--grad-accum", "2"]}.items():
        out = tmp_path / name
        assert _run(["train", "--model", "tiny-qwen2vl", *DATA, "--out-dir", str(out), "--steps", "3",
                     "--eval-every", "0", *COMMON, "--caption-eval", "0", *flags]) == 0
        runs[name] = (_losses(out), json.loads((out / "summary.json").read_text()))
    assert runs["ckpt"][0] == runs["plain"][0]
    assert runs["ckpt"][1]["saved_activation_bytes"] < runs["plain"][1]["saved_activation_bytes"]
    losses = runs["accum"][0]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert "caption_exact_match" not in runs["plain"][1]


def test_data_workers_encode_the_same_batches(tmp_path, monkeypatch):
    """--data-workers 2 encodes the batches in two worker processes: the same losses bit for bit as encoding them
    in the training process; on the CPU the default (-1, auto) takes none."""
    from fp8coat.train import vlm_run
    from fp8coat.train.data.vlm_batches import ImageTextData

    asked = []
    original = ImageTextData.train_batches

    def spy(self, batch_size, start_step=0, workers=0):
        asked.append(workers)
        return original(self, batch_size, start_step=start_step, workers=workers)

    monkeypatch.setattr(ImageTextData, "train_batches", spy)
    losses = {}
    for workers in ("2", "0"):
        out = tmp_path / f"w{workers}"
        assert _run(["train", "--model", "tiny-llava", *DATA, "--out-dir", str(out), "--steps", "3",
                     "--eval-every", "0", *COMMON, "--caption-eval", "0", "--data-workers", workers]) == 0
        losses[workers] = _losses(out)
    assert asked == [2, 0]
    assert losses["2"] == losses["0"]
    assert vlm_run.data_workers(-1, torch.device("cpu")) == 0
    assert 1 <= vlm_run.data_workers(-1, torch.device("cuda")) <= 4
    assert vlm_run.data_workers(3, torch.device("cuda")) == 3


@pytest.mark.parametrize("args,message", [
    (["--model", "tiny-llava", "--data", "shakespeare"], "vision-language model: --data must be image-text data"),
    (["--model", "tiny", "--data", "synthetic:24", "--tokenizer", "bytes"], "is image-text data: it trains a "
                                                                               "vision-language model"),
    (["--model", "tiny-llava", *DATA, "--tokenizer", "my/tokenizer.json"], "a vision-language model takes "
                                                                            "--tokenizer bpe"),
    (["--model", "tiny-llava", *DATA, "--fsdp", "on"], "FSDP of VLMs is not supported"),
    (["--model", "tiny-llava", *DATA, "--seq-len", "8"], "use a longer --seq-len"),
    (["--model", "tiny-llava", *DATA, "--data-workers", "-2"], "data-workers must be -1 (auto), 0 or more"),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert _run(["train", "--out-dir", str(out), "--steps", "1", *COMMON[:-6], *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_compare_table_has_vlm_columns(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _run(["compare", "--model", "tiny-llava", *DATA, "--out-dir", str(out), "--steps", "2",
                 "--variants", "bf16-torchopt,coat", "--eval-every", "0", *COMMON]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| run"))
    for column in ("caption exact match", "saved for backward", "saved: vision", "saved: LM"):
        assert f"| {column} |" in header
    results = json.loads((out / "compare.json").read_text())["results"]
    for runs in results.values():
        assert runs[0]["saved_vision_bytes"] + runs[0]["saved_lm_bytes"] == runs[0]["saved_activation_bytes"]
    coat, bf16 = results["coat"][0], results["bf16-torchopt"][0]
    assert coat["saved_lm_bytes"] < bf16["saved_lm_bytes"] and coat["saved_vision_bytes"] < bf16["saved_vision_bytes"]
    assert "**caption exact match**" in (out / "compare.md").read_text()
