"""HF Trainer integration: a converted model with fp8coat.AdamW trains, checkpoints and resumes under
transformers.Trainer (CPU, tiny model)."""

from __future__ import annotations

import os

import pytest
import torch

import fp8coat

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Windows(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32, vocab=128):
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, vocab, (seq * 4,), generator=g)
        self.items = [base.roll(int(i)).narrow(0, 0, seq) for i in torch.randint(0, seq * 4, (n,), generator=g)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def _trainer(out_dir, max_steps):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = fp8coat.convert(transformers.LlamaForCausalLM(cfg).bfloat16(), "coat")
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, save_steps=4, report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True,
    )
    optimizer = fp8coat.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    return transformers.Trainer(model=model, args=args, train_dataset=_Windows(), optimizers=(optimizer, None))


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    trainer = _trainer(tmp_path / "a", max_steps=8)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "optimizer.pt").exists()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert any(s["exp_avg"].dtype == torch.float8_e4m3fn for s in saved["state"].values())

    resumed = _trainer(tmp_path / "a", max_steps=8)  # same output dir: resume from its checkpoint-4
    resumed.train(resume_from_checkpoint=str(ckpt))
    again = [r["loss"] for r in resumed.state.log_history if "loss" in r]
    assert again[-4:] == pytest.approx(losses[-4:], rel=1e-6)
    assert os.path.isdir(tmp_path / "a" / "checkpoint-8")
