"""Compile time of Llama-7B-shaped models: build → first training step done, with every decoder layer compiled.

For each depth in ``--layers`` (e.g. 4 and 32), a fresh process-level dynamo/inductor state is not possible
inside one process, so the depths run in order and inductor's on-disk caches are disabled
(``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` is set before torch is imported): every compile is done from scratch.
Each run: build the HF ``LlamaForCausalLM`` (hidden 4096, 32 heads, intermediate 11008, vocab 32000, bf16, random
init) on the GPU, ``fp8coat.convert`` with the recipe, ``fp8coat.compile_layers`` on its decoder layers, then
training steps (forward, backward, ``fp8coat.AdamW`` step) on fresh random tokens. Reported: seconds to the end of
the first step and to the end of the second (the first converted forward allocates the FP8 weight caches, so
the second step compiles the steady-state variant once more), the median of the later steps, and dynamo's count of
compiled graphs.

Usage::

    python -m benchmarks.compile_time --layers 4,32 --out $OUT        # on a CUDA GPU
    python -m benchmarks.compile_time --dry-run                       # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")



def run(n_layers: int, args) -> dict:
    import torch._dynamo
    import transformers
    from torch._dynamo.utils import counters

    import fp8coat

    torch._dynamo.reset()
    counters.clear()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, heads, ffn, vocab = (64, 4, 176, 96) if args.dry_run else (4096, 32, 11008, 32000)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=args.seq, use_cache=False)
    cfg._attn_implementation = "sdpa"
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device, torch.bfloat16)
    fp8coat.convert(model, args.recipe).train()
    fp8coat.compile_layers(model.model.layers)
    opt = fp8coat.AdamW(model.parameters(), lr=1e-5)
    times = []
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
        s = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - (t0 if step == 0 else s))
    row = {"layers": n_layers, "recipe": args.recipe, "batch": args.batch, "seq": args.seq,
           "first_step_s": round(times[0], 2), "two_steps_s": round(times[0] + times[1], 2),
           "later_step_ms": round(statistics.median(times[2:]) * 1e3, 1),
           "graphs": int(counters["stats"]["unique_graphs"]), "fp8coat": os.path.dirname(fp8coat.__file__)}
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,32", help="comma list of depths, run in this order")
    ap.add_argument("--recipe", default="coat")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.seq, args.steps = 32, 3
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        rows.append(run(n, args))
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compile_time{'-' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
