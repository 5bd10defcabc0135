"""Training step of the Llama-7B-shaped 4-layer model under FSDP2 ``fully_shard`` against the same model unsharded.

Variants, each a fresh model in the same process (one rank; NCCL on a GPU, gloo with ``--dry-run`` on the CPU):

* ``unsharded``: ``fp8coat.convert(model, recipe)`` + ``fp8coat.AdamW`` (the anchor),
* ``fsdp``: the same, each decoder layer and then the root wrapped with ``fully_shard`` (BF16 all-gather),
* ``fsdp_fp8_gather``: ``fp8coat.enable_fp8_all_gather`` before sharding, the optimizer recording the gathered
  weights' amax (``record_amax_of``) and ``fp8coat.precompute_fp8_scales(model, opt)`` after each optimizer step
  (E4M3 all-gather; the scales from the amaxes the step recorded).

A step is forward, backward, optimizer step (and the scale precomputation), timed with CUDA events after warm-up;
reported: median ms, tokens/s, peak memory, and the ratio to ``unsharded`` measured in the same run. With one rank
the all-gather moves no data between GPUs: the ratio shows what FSDP2's bookkeeping and copies cost.

Usage::

    python -m benchmarks.fsdp --out $OUT              # on a CUDA GPU
    python -m benchmarks.fsdp --dry-run               # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import harness
from .provenance import run_meta

VARIANTS = ("unsharded", "fsdp", "fsdp_fp8_gather")


def _model(args, device):
    import transformers

    import fp8coat

    hidden, heads, ffn, vocab = (64, 4, 176, 96) if args.dry_run else (4096, 32, 11008, 32000)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=args.layers, num_attention_heads=heads,
                                   num_key_value_heads=heads, max_position_embeddings=args.seq, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device, torch.bfloat16)
    return fp8coat.convert(model, args.recipe).train(), vocab


def measure(variant: str, args) -> dict:
    from torch.distributed.fsdp import fully_shard

    import fp8coat
    from fp8coat.nn.fp8_all_gather import fp8_all_gather_parameters

    device = torch.device(args.device)
    model, vocab = _model(args, device)
    if variant == "fsdp_fp8_gather":
        fp8coat.enable_fp8_all_gather(model)
    if variant != "unsharded":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if args.compile:
        fp8coat.compile_layers(model.model.layers)
    gathered = fp8_all_gather_parameters(model) if variant == "fsdp_fp8_gather" else []
    opt = fp8coat.AdamW(model.parameters(), lr=1e-5, record_amax_of=gathered)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if variant == "fsdp_fp8_gather":
            fp8coat.precompute_fp8_scales(model, opt)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = harness.time_ms(step, device, args.warmup, args.steps)
    row = {"variant": variant, "ms": round(t["ms"], 2), "ms_min": round(t["ms_min"], 2),
           "tok_s": round(args.batch * args.seq / t["ms"] * 1e3)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--recipe", default="coat")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="fp8coat.compile_layers on the decoder layers")
    ap.add_argument("--only", default=",".join(VARIANTS))
    harness.add_common_args(ap, steps=10, steps_help="timed steps per variant", budget_s=300,
                            budget_help="(unused: every variant runs)", sections_help="(unused)",
                            dry_run_help="tiny shapes, gloo on the CPU")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 3, 1
    args = harness.finish_args(args)
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    cuda = torch.device(args.device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    rows = []
    try:
        for variant in args.only.split(","):
            row = measure(variant, args)
            base = next((r for r in rows if r["variant"] == "unsharded"), None)
            if base is not None:
                row["x_unsharded"] = round(base["ms"] / row["ms"], 3)  # > 1: faster than unsharded
            rows.append(row)
            harness.log(json.dumps(row))
            harness.Bench(args, {}).free()
    finally:
        dist.destroy_process_group()
    path = os.path.join(args.out, "fsdp.json")
    with open(path, "w") as f:
        json.dump({"meta": run_meta("benchmarks.fsdp", argv),
                   "config": {k: v for k, v in vars(args).items() if k != "sections"}, "rows": rows}, f, indent=1)
    harness.log(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
