"""Where a vision-language model's gradients first become NaN or inf: the backward op, with its forward's traceback.

    python -m scripts.locate_nonfinite --model runs/x/checkpoints/step_000240 --seq-len 320 [--recipe bf16]

Loads a checkpoint written by ``fp8coat train`` (or a preset, at random init), converts it with ``--recipe`` in
bf16 as ``fp8coat train`` does (``--autocast``: fp32 weights under bf16 autocast instead), and runs the training
loss's backward on ``--batches`` training batches under ``torch.autograd.detect_anomaly``: the first backward
function that returns NaN raises, naming itself and printing where its forward ran. Also prints the largest
|weight| per parameter (the ten largest) and, per batch, the loss and whether any gradient was non-finite.
"""

from __future__ import annotations

import argparse

import torch

import fp8coat
from fp8coat.train.config import TrainConfig
from fp8coat.train.vlm_presets import VLM_PRESETS
from fp8coat.train.vlm_run import setup_vlm, to_model, vlm_step_loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a VLM checkpoint folder or preset")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--recipe", default="bf16")
    ap.add_argument("--autocast", action="store_true", help="fp32 weights under bf16 autocast (bf16 recipe only)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=320)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    ckpt = None if args.model in VLM_PRESETS else args.model
    cfg = TrainConfig(model=args.model, data=args.data, seq_len=args.seq_len, seed=args.seed)
    dtype = torch.float32 if args.autocast else torch.bfloat16
    model, data, source = setup_vlm(cfg, args.model, ckpt, dtype, torch.device(args.device))
    model = fp8coat.convert(model, args.recipe).train()
    largest = sorted(((float(p.detach().abs().max()), n) for n, p in model.named_parameters()), reverse=True)
    print(f"{source}, recipe {args.recipe}{' under autocast' if args.autocast else ''}; largest |weight|:")
    for value, name in largest[:10]:
        print(f"  {value:12.4g}  {name}")
    for step in range(args.batches):
        batch = to_model(data.images.train_batch(args.batch_size, step), model)
        model.zero_grad(set_to_none=True)
        loss = vlm_step_loss(model, batch, args.autocast, chunked=True)
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        print(f"batch {step}: loss {loss.item():.4f}, {len(bad)} parameters with non-finite gradients"
              + (f" (first: {bad[0]})" if bad else ""))
        if bad:
            model.zero_grad(set_to_none=True)
            with torch.autograd.detect_anomaly(check_nan=True):
                try:
                    vlm_step_loss(model, batch, args.autocast, chunked=True).backward()
                except RuntimeError as err:
                    print(f"anomaly: {err}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
