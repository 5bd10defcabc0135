"""The main job on the CPU: `fp8coat train` / `fp8coat compare` smoke runs, exact resume, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fp8coat.train.cli import main
from fp8coat.train.progress import MetricsLog

pytest.importorskip("transformers")

COMMON = ["--model", "tiny", "--tokenizer", "bytes", "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
          "--eval-batches", "2", "--warmup-steps", "2"]


def _run(args) -> int:
    torch.set_num_threads(2)
    return main(args)


def test_train_smoke_writes_log_checkpoints_and_summary(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out-dir", str(out), "--steps", "6", "--eval-every", "3", "--save-every", "3", *COMMON]
    assert _run(args) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000003", "step_000006"]
    ckpt = out / "checkpoints" / "step_000006"
    files = {"config.json", "model.safetensors", "optimizer.pt", "state.json", "manifest.json"}
    assert files <= set(os.listdir(ckpt))
    log = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if "val_loss" in r] == [3, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "coat" and summary["final_val_loss"] > 0
    assert summary["saved_activation_bytes"] > 0 and summary["optimizer_state_bytes"] > 0


def test_uncached_fp8_weights_give_the_same_run_and_hold_nothing(tmp_path):
    """By default (and with --no-cache-fp8-weights) each micro-batch quantizes the weights again (here with
    gradient accumulation): the losses of the --cache-fp8-weights run exactly, and the summary counts no FP8 weight
    copies (the cached run: one byte per weight of the decoder layers' linears)."""
    runs, summaries = {}, {}
    for flags in ((), ("--cache-fp8-weights",), ("--no-cache-fp8-weights",)):
        out = tmp_path / ("_".join(flags) or "default")
        assert _run(["train", "--out-dir", str(out), "--steps", "3", "--grad-accum", "2", "--eval-every", "0", *flags,
                     *COMMON]) == 0
        runs[flags] = [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")]
        summaries[flags] = json.loads((out / "summary.json").read_text())
    assert runs[()] == runs[("--cache-fp8-weights",)] == runs[("--no-cache-fp8-weights",)]
    copies = {flags: summary["fp8_weight_copy_bytes"] for flags, summary in summaries.items()}
    assert copies[()] == copies[("--no-cache-fp8-weights",)] == 0
    assert copies[("--cache-fp8-weights",)] >= 4 * 12 * 128 * 128  # tiny: 4 layers, >= 12*H^2 weights each
    assert json.loads((tmp_path / "default" / "config.json").read_text())["cache_fp8_weights"] is False


def test_fp8_attention_option_keeps_the_forward_saves_less_and_stays_on_resume(tmp_path, capsys):
    """--fp8-attention (Recipe.fp8_attention): the first step's loss is the default run's (the same forward), the
    later ones differ (gradients at the FP8 q, k, v), less is saved for backward; the run's config records it and a
    resume may not turn it off."""
    losses, summaries = {}, {}
    for flags in ((), ("--fp8-attention",)):
        out = tmp_path / ("fp8" if flags else "default")
        assert _run(["train", "--out-dir", str(out), "--steps", "3", "--eval-every", "0", *flags, *COMMON]) == 0
        losses[flags] = [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")]
        summaries[flags] = json.loads((out / "summary.json").read_text())
    fp8 = ("--fp8-attention",)
    assert losses[fp8][0] == losses[()][0] and losses[fp8][1:] != losses[()][1:]
    assert summaries[fp8]["saved_activation_bytes"] < summaries[()]["saved_activation_bytes"]
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["fp8_attention"] is True
    assert json.loads((tmp_path / "default" / "config.json").read_text())["fp8_attention"] is False
    capsys.readouterr()
    assert _run(["train", "--out-dir", str(tmp_path / "fp8"), "--resume", "--steps", "4", "--no-fp8-attention",
                 *COMMON]) == 2
    assert "--fp8-attention False (the run has True)" in capsys.readouterr().err


def test_fp8_weight_cache_option_needs_an_fp8_recipe():
    """bf16 runs take the default (no cache); asking for FP8 weight copies of a BF16 model is refused by name."""
    from fp8coat.train.config import TrainConfig

    assert not TrainConfig(recipe="bf16").validate().cache_fp8_weights
    TrainConfig(recipe="bf16", cache_fp8_weights=False).validate()
    assert TrainConfig(recipe="coat", cache_fp8_weights=True).validate().cache_fp8_weights
    with pytest.raises(ValueError, match="--cache-fp8-weights .* needs an FP8 recipe"):
        TrainConfig(recipe="bf16", cache_fp8_weights=True).validate()


@pytest.mark.parametrize("extra", [[], ["--step-in-backward", "--grad-clip", "0"]])
def test_activation_checkpointing_gives_the_same_run_and_saves_only_layer_inputs(tmp_path, extra):
    """--activation-checkpointing recomputes each decoder layer in backward: the same losses, bit for bit (also
    with the update inside backward), and the decoder keeps only each layer's input (4 layers x 4 x 32 x 128 bf16,
    plus what the model saves outside its layers)."""
    runs, summaries = {}, {}
    for flag in ("--activation-checkpointing", "--no-activation-checkpointing"):
        out = tmp_path / flag
        assert _run(["train", "--out-dir", str(out), "--steps", "3", "--eval-every", "0", flag, *extra,
                     *COMMON]) == 0
        runs[flag] = [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl")]
        summaries[flag] = json.loads((out / "summary.json").read_text())
    assert runs["--activation-checkpointing"] == runs["--no-activation-checkpointing"]
    saved_ckpt = summaries["--activation-checkpointing"]["saved_activation_bytes"]
    saved_full = summaries["--no-activation-checkpointing"]["saved_activation_bytes"]
    layer_inputs = 4 * 4 * 32 * 128 * 2
    assert layer_inputs <= saved_ckpt < saved_full / 3, (saved_ckpt, saved_full)


@pytest.mark.parametrize("recipe,master,extra", [
    ("coat", "auto", []), ("bf16", "bf16-stochastic", []),
    ("coat", "bf16-stochastic", ["--step-in-backward", "--grad-clip", "0"]),
])
@pytest.mark.slow
def test_resume_continues_with_identical_losses(tmp_path, recipe, master, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--recipe", recipe, "--master-weights", master, "--eval-every", "0", *extra, *COMMON]
    assert _run(["train", "--out-dir", str(full), "--steps", "8", "--save-every", "4", *args]) == 0
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_000008")
    assert _run(["train", "--out-dir", str(part), "--steps", "8", "--save-every", "4", "--resume", *args]) == 0
    a = MetricsLog.read(full / "metrics.jsonl")
    b = MetricsLog.read(part / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))  # history up to the checkpoint kept, then continued
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical after resuming at step 4
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert sa["final_train_loss"] == sb["final_train_loss"]  # the mean of the last steps spans the resume
    assert sa["final_val_loss"] == sb["final_val_loss"]


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--recipe", "fp4"], "unknown recipe"),
    (["--seq-len", "5000"], "sequence length 5000 exceeds"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--model", "giant"], "unknown model"),
    (["--model", "pyproject.toml"], "--model pyproject.toml is not an HF config JSON"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'; expected one of fp8coat, torch, torchao-fp8"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--weight-decay", "nan"], "weight-decay must be a finite number >= 0, got nan"),
    (["--weight-decay", "-0.1"], "weight-decay must be a finite number >= 0, got -0.1"),
    (["--beta1", "1"], "beta1 must be in [0, 1), got 1.0"),
    (["--beta2", "nan"], "beta2 must be in [0, 1), got nan"),
    (["--grad-clip", "inf"], "grad-clip must be a finite number >= 0 (0: no clipping), got inf"),
    (["--min-lr-ratio", "nan"], "min-lr-ratio must be in [0, 1], got nan"),
    (["--keep-last", "-1"], "keep-last must be >= 0, got -1"),
    (["--recipe", "bf16", "--cache-fp8-weights"], "--cache-fp8-weights keeps the FP8 weight copies"),
    (["--recipe", "fp8-linear", "--fp8-attention"], "--fp8-attention has the attention core save FP8 q, k, v"),
])
def test_bad_input_gives_clear_errors_and_leaves_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert _run(["train", "--out-dir", str(out), "--steps", "2", *COMMON, *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_empty_data_folder_is_rejected(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "empty.txt").write_text("")
    out = tmp_path / "run"
    assert _run(["train", "--out-dir", str(out), "--data", str(tmp_path / "texts"), *COMMON]) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists()


def test_finetune_from_checkpoint_reuses_its_tokenizer(tmp_path):
    pre = tmp_path / "pre"
    assert _run(["train", "--out-dir", str(pre), "--steps", "20", "--recipe", "bf16", "--optimizer", "torch",
                 "--tokenizer", "bpe", "--vocab-size", "512", "--model", "tiny", "--batch-size", "4", "--seq-len", "32",
                 "--eval-batches", "2", "--warmup-steps", "1", "--log-every", "1", "--lr", "1e-2"]) == 0
    ckpt = pre / "checkpoints" / "step_000020"
    assert (ckpt / "tokenizer.json").exists()
    ft = tmp_path / "ft"
    assert _run(["train", "--out-dir", str(ft), "--steps", "3", "--recipe", "coat", "--model", str(ckpt),
                 "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--warmup-steps", "1",
                 "--log-every", "1"]) == 0
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["params"] == json.loads((pre / "summary.json").read_text())["params"]
    pre_log, ft_log = MetricsLog.read(pre / "metrics.jsonl"), MetricsLog.read(ft / "metrics.jsonl")
    # the fine-tune starts where the pretraining ended, far below a random init's loss
    assert ft_log[0]["loss"] < pre_log[0]["loss"] - 0.5, (pre_log[0]["loss"], pre_log[-1]["loss"], ft_log[0]["loss"])


@pytest.mark.parametrize("recipe,steps,rtol", [("bf16", 5, 5e-4), ("coat", 3, 2e-3)])
def test_chunked_loss_matches_full_logits(tmp_path, recipe, steps, rtol):
    """Same run with and without the chunked loss: equal up to rounding (measured: bf16 <= 7e-5 relative over 5
    steps; coat <= 5e-4 over 3 steps — FP8 quantization amplifies rounding differences step by step, by step 5
    a tiny run's losses can differ by 0.2%)."""
    runs = {}
    for flag in ("--chunked-loss", "--no-chunked-loss"):
        out = tmp_path / flag
        assert _run(["train", "--out-dir", str(out), "--steps", str(steps), "--recipe", recipe, "--eval-every", "0",
                     flag, *COMMON]) == 0
        runs[flag] = MetricsLog.read(out / "metrics.jsonl")
    assert len(runs["--chunked-loss"]) == steps
    for a, b in zip(runs["--chunked-loss"], runs["--no-chunked-loss"]):
        assert abs(a["loss"] - b["loss"]) < rtol * b["loss"], (a, b)


def test_step_in_backward_gives_the_same_run(tmp_path, capsys):
    """--step-in-backward (with gradient accumulation) reproduces the usual step's losses exactly; it needs
    --grad-clip 0, and --grad-clip 0 means no clipping."""
    runs = {}
    for flag in ("--step-in-backward", "--no-step-in-backward"):
        out = tmp_path / flag
        assert _run(["train", "--out-dir", str(out), "--steps", "4", "--grad-accum", "2", "--grad-clip", "0",
                     "--eval-every", "0", flag, *COMMON]) == 0
        runs[flag] = MetricsLog.read(out / "metrics.jsonl")
    assert [r["loss"] for r in runs["--step-in-backward"]] == [r["loss"] for r in runs["--no-step-in-backward"]]
    assert all(r["grad_norm"] is None for r in runs["--step-in-backward"])
    assert all(r["grad_norm"] > 0 for r in runs["--no-step-in-backward"])
    capsys.readouterr()
    assert _run(["train", "--out-dir", str(tmp_path / "bad"), "--steps", "1", "--step-in-backward", *COMMON]) != 0
    assert "pass --grad-clip 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compile_flag_compiles_each_decoder_layer(tmp_path):
    """--compile: decoder layers compiled in place (checkpoint keys unchanged), losses close to the eager run,
    through an evaluation in between (the layers' evaluation variants) and back to training."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = ["--steps", "3", "--eval-every", "2", "--save-every", "3", *COMMON]
    assert _run(["train", "--out-dir", str(eager), *args]) == 0
    assert _run(["train", "--out-dir", str(compiled), "--compile", *args]) == 0
    a = [r["loss"] for r in MetricsLog.read(eager / "metrics.jsonl")]
    b = [r["loss"] for r in MetricsLog.read(compiled / "metrics.jsonl")]
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(a, b)), (a, b)
    va = [r["val_loss"] for r in MetricsLog.read(eager / "metrics.jsonl") if "val_loss" in r]
    vb = [r["val_loss"] for r in MetricsLog.read(compiled / "metrics.jsonl") if "val_loss" in r]
    assert len(va) == len(vb) >= 1 and all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(va, vb)), (va, vb)
    from safetensors import safe_open

    keys = [set(safe_open(str(d / "checkpoints" / "step_000003" / "model.safetensors"), "pt").keys())
            for d in (eager, compiled)]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])


def test_compile_helper_compiles_layers_in_place():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp8coat.compiling import is_compiled
    from fp8coat.train.loop import _compile

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    keys = set(model.state_dict())
    assert _compile(model, model.model) is model.model  # the layers are compiled, not the step module
    assert all(is_compiled(layer) for layer in model.model.layers)
    assert set(model.state_dict()) == keys
    wrapped = _compile(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))  # no decoder layers: the module is wrapped
    assert type(wrapped).__name__ == "OptimizedModule"


def test_torchao_optimizer_is_optional(tmp_path, capsys):
    """``--optimizer torchao-fp8`` (a peer's FP8 AdamW, for comparisons): without torchao installed, a clear error
    before anything is written; the compare modifier maps to it."""
    import importlib.util

    from fp8coat.train.compare import variant_config
    from fp8coat.train.config import TrainConfig

    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed here")
    out = tmp_path / "ao"
    assert _run(["train", "--out-dir", str(out), "--steps", "2", *COMMON, "--optimizer", "torchao-fp8"]) == 2
    assert "needs torchao" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="needs torchao"):
        variant_config(TrainConfig(), "bf16-torchaofp8", 0, str(tmp_path))
