"""Where the time of one Llama-2-7B-shaped decoder layer's fwd+bwd goes: wall time per step, GPU busy time per
step, and the kernels ranked by GPU time, for BF16 and the fp8coat recipes.

    python -m scripts.profile_layer_gpu [--recipes bf16,coat,torchao] [--compile] [--batch 4 --seq 2048]  # GPU

A step whose wall time is well above its GPU busy time is host-bound (launch and Python overhead).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fp8coat
from fp8coat.conversion import weight_caches


def build(recipe: str, args):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=1,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000,
                      max_position_embeddings=max(4096, args.seq), use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
        rope = LlamaRotaryEmbedding(cfg)
    layer = layer.to(torch.bfloat16).train()
    if recipe == "torchao":  # torchao float8 training (tensorwise scaling), the usual anchor
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(layer)
    elif recipe != "bf16":
        fp8coat.convert(torch.nn.ModuleList([layer]), recipe)
    fn = torch.compile(layer) if args.compile else layer
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    with torch.no_grad():
        pe = rope(x, torch.arange(args.seq, device=args.device)[None])
    caches = weight_caches(layer)

    def step():
        for c in caches:  # a new optimizer step: weights are re-quantized (cached only with cache_fp8_weights on)
            c.clear()
        out = fn(x, position_embeddings=pe)
        (out[0] if isinstance(out, tuple) else out).backward(dy)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def profile_recipe(recipe: str, args) -> None:
    step = build(recipe, args)
    for _ in range(3):
        step()
    sync(args)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        sync(args)
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            kernels[evt.name].append(evt.device_time_total / 1e3)
    busy = sum(sum(v) for v in kernels.values()) / args.steps
    n_kernels = sum(len(v) for v in kernels.values()) / args.steps
    name = recipe + (" compiled" if args.compile else "")
    print(f"\n=== {name}: wall {wall_ms:.2f} ms/step, GPU busy {busy:.2f} ms/step, {n_kernels:.0f} kernels/step")
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    print(f"{'ms/step':>8} {'calls':>6}  kernel")
    for name, times in rows[: args.top]:
        print(f"{sum(times) / args.steps:8.3f} {len(times) / args.steps:6.1f}  {short(name)}")
    rest = sum(sum(t) for _, t in rows[args.top:]) / args.steps
    print(f"{rest:8.3f} {'':6}  ({len(rows) - args.top} more kernel names)")
    if args.cprofile:  # where the host time of a step goes (Python functions, by own time)
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            step()
        sync(args)
        pr.disable()
        print(f"--- {recipe}: host time by function over {args.steps} steps")
        pstats.Stats(pr).sort_stats("tottime").print_stats(args.top)
    del step
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="bf16,coat", help="comma list of bf16, fp8-linear, coat, torchao")
    ap.add_argument("--compile", action="store_true", help="torch.compile the layer")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    ap.add_argument("--cprofile", action="store_true", help="also a cProfile of the host time")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    for recipe in args.recipes.split(","):
        profile_recipe(recipe, args)


if __name__ == "__main__":
    main()
