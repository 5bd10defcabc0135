"""How far ``fp8coat.AdamW``'s FP8 second moment drifts from torch's over many steps, per beta2.

Each step moves v by ``(1 - beta2)`` of itself toward g². FP8 (E4M3: 3 mantissa bits) resolves about 6% of a
value, so at beta2 = 0.999 a step's change is far below one code, and the moment is re-encoded every step (with
its group's new absmax and expansion exponent): the rounding no longer averages out and v drifts. This study feeds
``fp8coat.AdamW`` and ``torch.optim.AdamW`` the same gradients on one parameter (``--rows`` × 256, fp32) for
``--steps`` steps and reports, per beta2 and gradient stream:

* ``v_ratio_median`` / ``v_ratio_mean``: fp8coat's decoded v over torch's v, elementwise, at the last step;
* ``update_ratio``: ‖Δp‖ of fp8coat over torch's, averaged over the last 200 steps (above 1: larger steps).

Gradient streams (fresh N(0, 1) per element and step, times a scale per column of the last dim):

* ``steady``: the column scales are drawn once from U(1, 4);
* ``heavy``: the column scales are drawn again every step from U(1, 4) (heavier-tailed g² per element).

Usage::

    python -m benchmarks.moment_drift --out /tmp/drift          # CPU, about a minute; drift.md and drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fp8coat  # noqa: E402
from benchmarks.provenance import run_meta  # noqa: E402
from fp8coat.optim import state_codec  # noqa: E402

STREAMS = ("steady", "heavy")
LAST = 200  # steps the update ratio averages over


def drift(beta2: float, stream: str, *, steps: int = 3000, rows: int = 64, seed: int = 0, expansion: bool = True,
          v_format: str = "e4m3") -> dict:
    """One run: ``{"beta2", "stream", "v_ratio_median", "v_ratio_mean", "update_ratio", ...}`` (see the module
    docstring). Deterministic for a seed."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, 256)
    ours, ref = torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(torch.zeros(shape))
    hyper = dict(lr=1e-4, betas=(0.9, beta2), weight_decay=0.0)
    with warnings.catch_warnings():  # beta2 above the optimizer's limit is what this study measures
        warnings.simplefilter("ignore", UserWarning)
        opt = fp8coat.AdamW([ours], expansion=expansion, v_format=v_format, min_quantized_numel=0, backend="torch",
                            **hyper)
    ref_opt = torch.optim.AdamW([ref], **hyper)
    scales = 1 + 3 * torch.rand(shape[1], generator=gen)
    update_ratios = []
    for step in range(1, steps + 1):
        if stream == "heavy":
            scales = 1 + 3 * torch.rand(shape[1], generator=gen)
        grad = torch.randn(shape, generator=gen) * scales
        before, ref_before = ours.detach().clone(), ref.detach().clone()
        ours.grad, ref.grad = grad.clone(), grad
        opt.step()
        ref_opt.step()
        if step > steps - LAST:
            update_ratios.append(float((ours.detach() - before).norm() / (ref.detach() - ref_before).norm()))
    state = opt.state[ours]
    v = state_codec.decode(state["exp_avg_sq"], state["exp_avg_sq_absmax"], state.get("exp_avg_sq_expo"), v_format,
                           opt.param_groups[0]["group_size"])
    ratio = v / ref_opt.state[ref]["exp_avg_sq"]
    return {"beta2": beta2, "stream": stream, "steps": steps, "v_format": v_format, "expansion": expansion,
            "v_ratio_median": float(ratio.median()), "v_ratio_mean": float(ratio.mean()),
            "update_ratio": sum(update_ratios) / len(update_ratios)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# FP8 second-moment drift ({meta['date']}, commit {meta['commit']})", "", f"`{meta['command']}`", "",
             "| beta2 | gradients | v fp8coat / torch (median) | (mean) | ‖update‖ fp8coat / torch (last 200 steps) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['beta2']} | {r['stream']} | {r['v_ratio_median']:.3f} | {r['v_ratio_mean']:.3f} | "
                     f"{r['update_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--betas2", default="0.95,0.98,0.99,0.995,0.999", help="comma-separated beta2 values")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", default="/tmp/fp8coat_moment_drift")
    args = ap.parse_args(argv)
    if args.steps <= LAST:
        ap.error(f"--steps must be > {LAST}")
    rows = []
    for beta2 in (float(b) for b in args.betas2.split(",") if b):
        for stream in STREAMS:
            rows.append(drift(beta2, stream, steps=args.steps, rows=args.rows))
            print(json.dumps(rows[-1]), flush=True)
    meta = run_meta("benchmarks.moment_drift", argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "drift.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(rows, meta)
    with open(os.path.join(args.out, "drift.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
