"""CPU demo: the same small Llama trained on Shakespeare with ``torch.optim.AdamW`` (fp32 moments) and with
``fp8coat.AdamW`` (FP8 moments + dynamic range expansion), printing both losses and the optimizer-state bytes."""

from __future__ import annotations

import time

import torch

from .data import shakespeare_text
from .optim import AdamW

__all__ = ["run_demo"]

SEQ, BATCH = 128, 16


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _batches(tokens: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - SEQ - 1, (BATCH,), generator=g)
        yield torch.stack([tokens[s: s + SEQ] for s in starts.tolist()])


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k != "step")


def run_demo(steps: int = 200, seed: int = 0, threads: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    text = shakespeare_text()
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    split = int(0.98 * data.numel())
    train, val = data[:split], data[split:]
    print(f"corpus: {data.numel() / 1e6:.1f}M bytes of Shakespeare (byte-level tokens), {steps} steps, "
          f"batch {BATCH}x{SEQ}")
    runs = {}
    for name, make_opt in (
        ("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)),
        ("fp8coat.AdamW", lambda ps: AdamW(ps, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ):
        model = _model(seed)
        opt = make_opt(model.parameters())
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.time()
        losses = []
        for step, ids in enumerate(_batches(train, steps, seed + 1), 1):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % max(1, steps // 5) == 0 or step == steps:
                print(f"  [{name}] step {step:4d}  loss {sum(losses[-20:]) / len(losses[-20:]):.4f}", flush=True)
        model.eval()
        with torch.no_grad():
            val_loss = sum(model(input_ids=ids, labels=ids).loss.item() for ids in _batches(val, 8, 999)) / 8
        runs[name] = dict(final_train=sum(losses[-20:]) / len(losses[-20:]), val=val_loss,
                          state_bytes=_state_bytes(opt), params=n_params, seconds=time.time() - t0)
    print()
    print("| optimizer | train loss (last 20) | val loss | optimizer state | bytes/param | time |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['final_train']:.4f} | {r['val']:.4f} | {r['state_bytes'] / 2**20:.2f} MiB | "
              f"{r['state_bytes'] / r['params']:.2f} | {r['seconds']:.0f} s |")
    return runs
