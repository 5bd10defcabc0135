"""How close a recipe's gradients are to fp32's, per part of a vision-language model, on the same weights and batch.

    python -m scripts.grad_fidelity --model llava-100m --recipes bf16,coat,fp8-linear        # GPU
    python -m scripts.grad_fidelity --model runs/x/checkpoints/step_000400 --data synthetic    # a trained model
    python -m scripts.grad_fidelity --model tiny-llava --batch-size 4 --seq-len 48             # CPU

The reference runs the model in fp32 (no autocast). ``bf16`` is the usual BF16 baseline (fp32 weights under bf16
autocast); every other recipe converts a bf16 copy of the model with :func:`fp8coat.convert`, as ``fp8coat train``
does. For each recipe the gradients of each parameter are compared with the reference's over ``--batches``
validation batches (summed): SQNR in dB (10·log10(|g_ref|² / |g − g_ref|²)) and cosine similarity, then grouped by
part (vision blocks, projector, LM layers, embeddings and head). A part whose SQNR under a recipe sits well below
the other parts, or below BF16's there by much more than elsewhere, is where that recipe's gradients lose
information. ``--out FILE`` writes every parameter's figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from collections import defaultdict

import torch

import fp8coat
from fp8coat.train.config import TrainConfig
from fp8coat.train.vlm_presets import VLM_PRESETS
from fp8coat.train.vlm_run import setup_vlm, to_model, vlm_step_loss


def part_of(name: str) -> str:
    """The part a parameter belongs to: its block with the index replaced by ``*`` (``model.language_model.
    layers.*.mlp.down_proj.weight``), so that the same weight of every block lands in one group."""
    return re.sub(r"\.(\d+)\.", ".*.", name)


def gradients(model: torch.nn.Module, batches: list[dict], autocast: bool) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of the loss gradients of every parameter that gets one, in fp32 on the CPU."""
    model.zero_grad(set_to_none=True)
    model.train()
    for batch in batches:
        vlm_step_loss(model, to_model(batch, model), autocast, chunked=True).backward()
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per parameter of ``ref``: ``{"sqnr_db", "cosine", "ref_sq", "err_sq"}`` (a missing gradient counts as 0)."""
    out = {}
    for name, r in ref.items():
        g = got.get(name, torch.zeros_like(r))
        ref_sq, err_sq = float(r.double().square().sum()), float((g - r).double().square().sum())
        denom = float(r.double().norm() * g.double().norm())
        out[name] = {"sqnr_db": _db(ref_sq, err_sq), "cosine": float((r.double() * g.double()).sum()) / denom
                     if denom > 0 else float("nan"), "ref_sq": ref_sq, "err_sq": err_sq}
    return out


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def grouped(per_param: dict[str, dict]) -> dict[str, float]:
    """SQNR in dB per part: the summed signal over the summed error of its parameters."""
    sig, err = defaultdict(float), defaultdict(float)
    for name, v in per_param.items():
        sig[part_of(name)] += v["ref_sq"]
        err[part_of(name)] += v["err_sq"]
    return {part: _db(sig[part], err[part]) for part in sig}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava", help="a VLM preset or a VLM checkpoint folder")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--recipes", default="bf16,fp8-linear,coat")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=320)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file for every parameter's figures")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    ckpt = None if args.model in VLM_PRESETS else args.model
    cfg = TrainConfig(model=args.model, data=args.data, seq_len=args.seq_len, seed=args.seed)
    model, data, source = setup_vlm(cfg, args.model, ckpt, torch.float32, device)
    batches = data.images.val_batches(args.batch_size, args.batches)
    print(f"{source}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.batches} batches of "
          f"{args.batch_size} x {args.seq_len} on {device}")
    ref = gradients(model, batches, autocast=False)
    results = {}
    for recipe in [r for r in args.recipes.split(",") if r]:
        if recipe == "bf16":
            got = gradients(model, batches, autocast=True)
        else:
            converted = fp8coat.convert(copy.deepcopy(model).to(torch.bfloat16), recipe)
            got = gradients(converted, batches, autocast=False)
            del converted
        results[recipe] = compare(ref, got)
    parts = sorted({part_of(n) for n in ref})
    names = list(results)
    by_part = {r: grouped(results[r]) for r in names}
    width = max(len(p) for p in parts)
    print(f"{'part (SQNR dB of the gradient against fp32)':<{width}}  " + "  ".join(f"{r:>10}" for r in names))
    for part in parts:
        print(f"{part:<{width}}  " + "  ".join(f"{by_part[r][part]:>10.1f}" for r in names))
    for r in names:
        worst = sorted(results[r].items(), key=lambda kv: kv[1]["sqnr_db"])[:8]
        print(f"\n{r}: lowest SQNR parameters")
        for name, v in worst:
            print(f"  {name:<{width}}  {v['sqnr_db']:7.1f} dB  cosine {v['cosine']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "source": source, "batch_size": args.batch_size,
                       "seq_len": args.seq_len, "batches": args.batches, "by_part": by_part,
                       "per_param": results}, f, indent=1)


if __name__ == "__main__":
    main()
