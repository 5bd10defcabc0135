"""End to end on the CPU: a tiny Llama trained on real text with the coat recipe tracks the BF16 recipe."""

from __future__ import annotations

import pytest
import torch

import fp8coat
from fp8coat.train.data import shakespeare_text

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # a convergence run (make test-slow)

SEQ, BATCH, STEPS = 64, 8, 200


def _train(recipe: str, tokens: torch.Tensor) -> list[float]:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = fp8coat.convert(transformers.LlamaForCausalLM(cfg).bfloat16(), recipe)
    model.train()
    opt = fp8coat.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        starts = torch.randint(0, tokens.numel() - SEQ, (BATCH,), generator=g).tolist()
        ids = torch.stack([tokens[s: s + SEQ] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_coat_tracks_bf16_on_shakespeare():
    torch.set_num_threads(2)
    text = shakespeare_text()[:2_000_000]
    tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    ref = _train("bf16", tokens)
    coat = _train("coat", tokens)
    final_ref, final_coat = sum(ref[-20:]) / 20, sum(coat[-20:]) / 20
    print(f"final loss (mean of last 20 steps): bf16 {final_ref:.4f}, coat {final_coat:.4f}, "
          f"gap {100 * (final_coat / final_ref - 1):+.2f}%")
    assert ref[-1] < 0.6 * ref[0]  # it learned something
    assert abs(final_coat / final_ref - 1) < 0.02
