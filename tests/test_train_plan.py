"""The memory plan ``fp8coat train`` prints before building the model on a GPU (fp8coat/train/memory_plan.py)."""

from __future__ import annotations

import json

import pytest

from fp8coat.memory.plan import GIB
from fp8coat.train.config import TrainConfig
from fp8coat.train.memory_plan import plan_lines, report_plan, run_plan


def _cfg(**kw) -> TrainConfig:
    base = dict(model="llama2-7b", recipe="coat", batch_size=16, seq_len=2048)
    return TrainConfig(**{**base, **kw}).validate()


def test_plan_follows_the_run_configuration():
    """Each option of the run reaches the planner: the peak moves the way the option moves memory."""
    shape, settings, plan = run_plan(_cfg(), "llama2-7b", 32000)
    assert shape.layers == 32 and shape.vocab == 32000 and settings.batch == 16 and settings.device == "cuda"
    peak = plan.peak
    assert run_plan(_cfg(batch_size=8), "llama2-7b", 32000)[2].peak < peak
    assert not settings.cache_fp8_weights  # the default: no FP8 weight copies
    assert run_plan(_cfg(cache_fp8_weights=True), "llama2-7b", 32000)[2].peak > peak
    assert run_plan(_cfg(step_in_backward=True, grad_clip=0.0), "llama2-7b", 32000)[2].peak < peak
    assert run_plan(_cfg(recipe="bf16", optimizer="torch"), "llama2-7b", 32000)[2].peak > peak
    assert run_plan(_cfg(activation_checkpointing=True), "llama2-7b", 32000)[2].peak < peak
    assert run_plan(_cfg(batch_size=16), "llama2-7b", 32000, world_size=4)[2].peak < peak
    # a preset takes the tokenizer's vocabulary; a config file keeps a larger one of its own
    assert run_plan(_cfg(), "llama2-7b", 16384)[0].vocab == 16384


def test_config_file_vocabulary_is_widened_to_the_tokenizer(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 1000}))
    assert run_plan(_cfg(model=str(path)), str(path), 500)[0].vocab == 1000
    assert run_plan(_cfg(model=str(path)), str(path), 4000)[0].vocab == 4000


def test_plan_lines_warn_only_when_the_peak_does_not_fit():
    shape, settings, plan = run_plan(_cfg(), "llama2-7b", 32000)
    peak_gib = plan.peak / GIB
    summary, warning = plan_lines(shape, settings, plan, peak_gib * 1.2)
    assert warning is None
    assert f"predicted peak {peak_gib:.1f} GiB per GPU" in summary and "activations saved for backward" in summary
    fits = int(summary.split("the largest --batch-size that fits: ")[1].split(" ")[0])
    assert fits >= 16
    summary, warning = plan_lines(shape, settings, plan, peak_gib * 0.8)
    assert warning is not None and f"{peak_gib:.1f} GiB per GPU" in warning
    fits = int(warning.split("--batch-size ")[1].split(" ")[0])
    assert 1 <= fits < 16
    assert "--step-in-backward" in warning and "cache-fp8-weights" not in warning
    _, warning = plan_lines(shape, settings, plan, 1.0)  # nothing fits
    assert "no batch fits" in warning
    shape, settings, plan = run_plan(_cfg(cache_fp8_weights=True), "llama2-7b", 32000)
    _, warning = plan_lines(shape, settings, plan, plan.peak / GIB * 0.8)  # the copies are worth dropping
    assert "--step-in-backward" in warning and "--no-cache-fp8-weights" in warning
    _, warning = plan_lines(shape, settings, plan, 1.0)
    assert "no batch fits" in warning


def test_report_prints_summary_and_warning_and_names_unknown_models(tmp_path, capsys):
    report_plan(_cfg(), "llama2-7b", 32000, 1, 10.0)
    out, err = capsys.readouterr()
    assert out.startswith("memory plan: predicted peak") and "warning: the predicted peak memory" in err
    report_plan(_cfg(), "llama2-7b", 32000, 1, 10.0, quiet=True)
    out, err = capsys.readouterr()
    assert out == "" and "warning" in err  # the warning is printed even when quiet
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100}))
    report_plan(_cfg(model=str(path)), str(path), 100, 1, 80.0)
    out, err = capsys.readouterr()
    assert "memory plan: none for this model" in out and "gpt2" in out and err == ""


@pytest.mark.parametrize("bad", ["no/such/model"])
def test_unknown_model_sources_raise(bad):
    with pytest.raises(ValueError, match="unknown model"):
        run_plan(_cfg(), bad, 32000)


def test_gpu_memory_is_the_usable_share_of_the_total(monkeypatch):
    """A run plans against 95% of the GPU's memory (CUDA context, workspaces, the allocator's reserve): a batch
    whose planned peak fits the total but not that share is reported as not fitting."""
    import types

    import torch

    from fp8coat.train import memory_plan

    total = 140.4 * GIB  # an H200
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=total))
    gib = memory_plan.gpu_memory_gib()
    assert gib == pytest.approx(140.4 * memory_plan.USABLE_FRACTION)
    shape, settings, plan = run_plan(_cfg(batch_size=23, step_in_backward=True, grad_clip=0.0, compile=True,
                                          master_weights="bf16-stochastic"), "llama2-7b", 32000)
    assert gib * GIB < plan.peak < total  # batch 23: planned 134.8 GiB, out of memory on the H200
    assert plan_lines(shape, settings, plan, gib)[1] is not None  # the warning
    assert plan_lines(shape, settings, plan, total / GIB)[1] is None
