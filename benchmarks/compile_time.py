"""Compile time of Llama-7B-shaped models: build → first training step done, with every decoder layer compiled.

For each depth in ``--layers`` (e.g. 4 and 32), a fresh process-level dynamo/inductor state is not possible
inside one process, so the depths run in order and inductor's on-disk caches are disabled
(``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` is set before torch is imported): every compile is done from scratch.
Each run builds the HF ``LlamaForCausalLM`` (hidden 4096, 32 heads, intermediate 11008, vocab 32000, random init)
directly on the GPU in its parameter dtype, then, by ``--library``:

* ``fp8coat`` (default): bf16 parameters, ``fp8coat.convert`` with ``--recipe``, ``fp8coat.compile_layers`` on the
  decoder layers, ``fp8coat.AdamW``;
* ``torchao``: as the anchor measurements (``benchmarks/llama7b.py``): fp32 parameters, torchao
  ``convert_to_float8_training`` (lm_head left out), ``torch.compile`` of each decoder layer, ``AdamWFp8``, bf16
  autocast around the forward (skipped with a message when torchao is absent);
* ``bf16``: fp32 parameters, bf16 autocast, ``torch.compile`` of each decoder layer, fused ``torch.optim.AdamW``;

and ``--eager`` leaves the layers uncompiled (the eager first step; target ≤ 10 s for fp8coat's 32-layer model).
Then training steps (forward, backward, optimizer step) on fresh random tokens. Reported: seconds to the end of
the first step and to the end of the second, counted from the start of the build (with the FP8 weight cache on,
``Recipe.cache_fp8_weights``, the first converted forward allocates the caches and the second step compiles the
steady-state variant once more; the recipes' default keeps no cache), the build alone
and the first step alone, the median of the later steps, and dynamo's count of compiled graphs. The result file is
``compile_time[-<library>][-eager][-<tag>].json`` (the library named unless it is fp8coat).

Usage::

    python -m benchmarks.compile_time --layers 4,32 --out $OUT                     # on a CUDA GPU
    python -m benchmarks.compile_time --library torchao --layers 4,32 --out $OUT
    python -m benchmarks.compile_time --eager --layers 32 --out $OUT               # eager first step
    python -m benchmarks.compile_time --dry-run                                    # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

EAGER_TARGET_S = 10.0  # fp8coat's eager first step of the 32-layer model (seconds)


def build(n_layers: int, args, device):
    """``(model, optimizer, amp)`` of ``args.library`` at ``n_layers`` decoder layers, built on ``device``."""
    import torch

    import fp8coat
    from benchmarks.llama7b import DRY_SHAPE, FULL_SHAPE, build_llama

    shape = dict(DRY_SHAPE if args.dry_run else FULL_SHAPE, layers=n_layers)
    if args.library == "fp8coat":
        model = build_llama(shape, args.seq, torch.bfloat16, device)
        fp8coat.convert(model, args.recipe)
        if not args.eager:
            fp8coat.compile_layers(model.model.layers)
        return model, fp8coat.AdamW(model.parameters(), lr=1e-5), False
    model = build_llama(shape, args.seq, torch.float32, device)
    if args.library == "torchao":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda m, n: "lm_head" not in n)
    if not args.eager:  # as the anchor measurements: each decoder layer replaced by its torch.compile wrapper
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(layer)
    if args.library == "torchao":
        from torchao.optim import AdamWFp8

        return model, AdamWFp8(model.parameters(), lr=1e-5), True
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda"), True


def run(n_layers: int, args) -> dict:
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    import fp8coat

    torch._dynamo.reset()
    counters.clear()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = 96 if args.dry_run else 32000
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model, opt, amp = build(n_layers, args, device)
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    times = []
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
        s = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            step1_s = time.perf_counter() - s
        times.append(time.perf_counter() - (t0 if step == 0 else s))
    recipe = {"fp8coat": args.recipe, "torchao": "torchao-float8", "bf16": "bf16"}[args.library]
    row = {"layers": n_layers, "recipe": recipe, "batch": args.batch, "seq": args.seq,
           "first_step_s": round(times[0], 2), "two_steps_s": round(times[0] + times[1], 2),
           "later_step_ms": round(statistics.median(times[2:]) * 1e3, 1),
           "graphs": int(counters["stats"]["unique_graphs"]), "fp8coat": os.path.dirname(fp8coat.__file__),
           "library": args.library, "compiled": not args.eager, "build_s": round(build_s, 2),
           "step1_s": round(step1_s, 2)}
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,32", help="comma list of depths, run in this order")
    ap.add_argument("--library", choices=("fp8coat", "torchao", "bf16"), default="fp8coat")
    ap.add_argument("--recipe", default="coat", help="fp8coat's recipe (--library fp8coat)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile: the eager first step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.seq, args.steps = 32, 3
    args.steps = max(args.steps, 3)  # the first two steps compile; the later ones give the step time
    if args.library == "torchao":
        import importlib.util

        import torch

        if importlib.util.find_spec("torchao") is None or not torch.cuda.is_available():
            print("compile_time --library torchao skipped: "
                  + ("torchao is not installed" if torch.cuda.is_available() else "torchao float8 needs a CUDA GPU"),
                  flush=True)
            return 0
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        rows.append(run(n, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.eager and args.library == "fp8coat":
            ok = rows[-1]["step1_s"] <= EAGER_TARGET_S
            print(f"eager first step {rows[-1]['step1_s']:.1f}s {'<=' if ok else '>'} target {EAGER_TARGET_S:.0f}s "
                  f"({n} layers)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    parts = [args.library] if args.library != "fp8coat" else []
    parts += ["eager"] if args.eager else []
    parts += [args.tag] if args.tag else []
    path = os.path.join(args.out, "-".join(["compile_time", *parts]) + ".json")
    from benchmarks.provenance import gpu_name, run_meta

    meta = run_meta("benchmarks.compile_time", argv)
    meta["gpu"] = gpu_name() or "none (CPU)"
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
