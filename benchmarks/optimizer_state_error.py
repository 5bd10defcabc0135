"""Quantization error of the Adam update direction m/√v under FP8 optimizer-state codecs (COAT Table 1).

Trains a tiny Llama-style byte-level language model on the Shakespeare corpus with fp32 ``torch.optim.AdamW``,
snapshots the first and second moments ``m`` (``exp_avg``) and ``v`` (``exp_avg_sq``) of every parameter that
``fp8coat.AdamW`` stores in FP8 (>= 2 dims and >= 4096 elements), and for every pair (first-moment codec,
second-moment codec) in {E4M3, E4M3+Expand, E5M2, E5M2+Expand}² round-trips m and v through
``fp8coat.optim.state_codec.encode``/``decode`` (groups of 128 along the last dim, as the optimizer stores them).

For each element, with t the step count of the snapshot,

    u     = m̂ / (√v̂ + eps),          m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)     (fp32 states)
    u_q   = m̂_q / (√v̂_q + eps)       (same with the decoded states)

and the reported numbers are, pooled over all elements of all selected tensors (N elements in total),

    MSE          = Σ (u_q − u)² / N
    relative err = sqrt(Σ (u_q − u)²) / sqrt(Σ u²)

Usage::

    python -m benchmarks.optimizer_state_error [--steps 300] [--seed 0] [--out runs/optimizer_state_error]

Writes ``results.md`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from fp8coat.formats import get_format
from fp8coat.optim.state_codec import decode, encode
from fp8coat.train.data.corpus import shakespeare_text

# (label, fp8 format, dynamic range expansion)
CODECS = (
    ("E4M3", "e4m3", False),
    ("E4M3+Expand", "e4m3", True),
    ("E5M2", "e5m2", False),
    ("E5M2+Expand", "e5m2", True),
)
GROUP_SIZE = 128
MIN_QUANTIZED_NUMEL = 4096  # fp8coat.AdamW default: smaller or 1-D parameters keep fp32 moments


# ------------------------------------------------------------------------------------------------- data, model


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor of shape ``(n_bytes,)`` with values in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def sample_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq + 1`` tokens: int64 ``(batch, seq + 1)``."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def tiny_llama(hidden: int = 256, layers: int = 4, heads: int = 4, mlp: int = 688, seq: int = 128):
    """A ``transformers.LlamaForCausalLM`` with a 256-token byte vocabulary, fp32, untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def quantized_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters whose moments ``fp8coat.AdamW`` stores in FP8: >= 2 dims and >= 4096 elements."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() >= 2 and p.numel() >= MIN_QUANTIZED_NUMEL]


def snapshot(model: torch.nn.Module, opt: torch.optim.AdamW) -> dict:
    """Copies of the fp32 moments of the quantized parameters: ``{"step": t, "tensors": [(name, m, v), ...]}``."""
    tensors = []
    step = None
    for name, p in quantized_params(model):
        st = opt.state[p]
        step = int(st["step"])
        tensors.append((name, st["exp_avg"].detach().clone(), st["exp_avg_sq"].detach().clone()))
    return {"step": step, "tensors": tensors}


def train(args) -> tuple[torch.nn.Module, torch.optim.AdamW, dict[int, dict], list[dict]]:
    """Train for ``args.steps`` steps; returns model, optimizer, ``{step: snapshot}`` and the loss log."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = byte_tokens(shakespeare_text())
    model = tiny_llama(args.hidden, args.layers, args.heads, args.mlp, args.seq)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.wd
    )
    n_params = sum(p.numel() for p in model.parameters())
    n_quant = sum(p.numel() for _, p in quantized_params(model))
    print(f"model: {n_params:,} parameters, {n_quant:,} in FP8-stored tensors; corpus {data.numel():,} bytes")
    want = set(args.snapshot_at) | {args.steps}
    snaps, log = {}, []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        # Linear warm-up over the first 5% of steps, then constant (short run; the states are what matter).
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / max(1, args.steps // 20))
        tokens = sample_batch(data, args.batch, args.seq, gen)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            elapsed = time.perf_counter() - t0
            log.append({"step": step, "loss": loss.item(), "elapsed_s": round(elapsed, 2)})
            print(f"step {step:5d}  loss {loss.item():.4f}  ({elapsed:.1f} s)", flush=True)
        if step in want:
            snaps[step] = snapshot(model, opt)
    return model, opt, snaps, log


# ------------------------------------------------------------------------------------------------- error metric


def roundtrip(x: torch.Tensor, fmt: str, expand: bool) -> torch.Tensor:
    """fp32 ``x`` -> FP8 codes (groups of 128 along the last dim) -> fp32, same shape."""
    q, absmax, expo = encode(x, fmt, GROUP_SIZE, expand)
    return decode(q, absmax, expo, fmt, GROUP_SIZE)


def flat_block_roundtrip(x: torch.Tensor, fmt: str, block: int = 256) -> torch.Tensor:
    """fp32 ``x`` -> plain FP8 in blocks of ``block`` consecutive elements of the *flattened* tensor (absmax scale
    per block, no expansion: the layout of torchao's ``AdamWFp8``) -> fp32. Unlike groups along the last dim, a
    block can span the end of one row and the start of the next when the row length is not a multiple of it."""
    f = get_format(fmt)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / f.max
    q = (blocks / scale).clamp(-f.max, f.max).to(f.dtype).float() * scale
    return q.reshape(-1)[: flat.numel()].view_as(x)


# (label, round trip) of the state layouts compared by :func:`layout_comparison`, E4M3 for both moments
LAYOUTS = (
    ("rows/128, plain", lambda x: roundtrip(x, "e4m3", False)),
    ("flat/256, plain", lambda x: flat_block_roundtrip(x, "e4m3", 256)),
    ("rows/128, expansion", lambda x: roundtrip(x, "e4m3", True)),
)


def layout_comparison(snap: dict, beta1: float, beta2: float, eps: float) -> dict:
    """E4M3 m and v in three layouts (:data:`LAYOUTS`): pooled MSE of the Adam direction, entries of m and v
    flushed to 0, and the largest |u_q| / largest |u| (a flushed v turns u into m̂/eps)."""
    t = snap["step"]
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    out = {lab: {"sq_err": 0.0, "m_flushed": 0, "v_flushed": 0, "max_abs_u_q": 0.0} for lab, _ in LAYOUTS}
    n, max_u = 0, 0.0
    for _, m, v in snap["tensors"]:
        u = update_direction(m, v, bc1, bc2, eps)
        n += u.numel()
        max_u = max(max_u, float(u.abs().max()))
        for lab, rt in LAYOUTS:
            m_q, v_q = rt(m), rt(v)
            u_q = update_direction(m_q, v_q, bc1, bc2, eps)
            o = out[lab]
            o["sq_err"] += float(((u_q - u).double() ** 2).sum())
            o["m_flushed"] += int(((m != 0) & (m_q == 0)).sum())
            o["v_flushed"] += int(((v != 0) & (v_q == 0)).sum())
            o["max_abs_u_q"] = max(o["max_abs_u_q"], float(u_q.abs().max()))
    return {"step": t, "max_abs_u": max_u,
            "layouts": {lab: {"mse": o["sq_err"] / n, "m_flushed": o["m_flushed"], "v_flushed": o["v_flushed"],
                              "max_abs_u_q": o["max_abs_u_q"]} for lab, o in out.items()}}


def layout_report(res: dict) -> str:
    """Markdown table of one :func:`layout_comparison` result."""
    rows = ["| E4M3 m and v | MSE of m̂/(√v̂+eps) | m entries flushed | v entries flushed | max abs u_q |",
            "|---|---|---|---|---|"]
    for lab, o in res["layouts"].items():
        rows.append(f"| {lab} | {o['mse']:.4e} | {o['m_flushed']} | {o['v_flushed']} | {o['max_abs_u_q']:.3g} |")
    return "\n".join([f"#### State layouts at step {res['step']} (max abs u = {res['max_abs_u']:.3g})", "",
                      *rows, ""])


def expansion_exponents(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Expansion exponent k (fp32, 1-D) of every group of ``x`` that is not all zero."""
    _, absmax, expo = encode(x, fmt, GROUP_SIZE, True)
    return (expo.float() / 16.0)[absmax > 0]


def update_direction(m: torch.Tensor, v: torch.Tensor, bc1: float, bc2: float, eps: float) -> torch.Tensor:
    """AdamW direction ``m̂ / (√v̂ + eps)`` (fp32, shape of ``m``), computed as torch.optim.AdamW does."""
    return (m / bc1) / ((v / bc2).sqrt() + eps)


def moment_stats(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Error of one decoded moment: sums for pooling, and how many non-zero entries were flushed to zero."""
    err = (got - ref).double()
    return {
        "sq_err": float((err * err).sum()),
        "sq_ref": float((ref.double() ** 2).sum()),
        "nonzero": int((ref != 0).sum()),
        "flushed": int(((ref != 0) & (got == 0)).sum()),
    }


def evaluate(snap: dict, beta1: float, beta2: float, eps: float) -> dict:
    """All 16 (m codec, v codec) combinations for one snapshot.

    Returns ``{"step", "n_elements", "mse": {m_label: {v_label: float}}, "rel": {...}, "moments": {...},
    "per_tensor": [...]}``; MSE and relative error are pooled over every element of every tensor (see the module
    docstring); ``per_tensor`` holds each tensor's own MSE for the E4M3/E4M3 and E4M3+Expand/E4M3+Expand pairs.
    """
    t = snap["step"]
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    labels = [c[0] for c in CODECS]
    sq_err = {a: {b: 0.0 for b in labels} for a in labels}
    sq_ref, n = 0.0, 0
    moments = {key: {lab: {"sq_err": 0.0, "sq_ref": 0.0, "nonzero": 0, "flushed": 0} for lab in labels}
               for key in ("m", "v")}
    # Pooled contribution of elements whose decoded v is 0 but whose reference v is not (there u_q = m̂_q / eps).
    sq_err_v_flushed = {a: {b: 0.0 for b in labels} for a in labels}
    per_tensor = []
    expo = {key: {lab: [] for lab, _, ex in CODECS if ex} for key in ("m", "v")}
    for name, m, v in snap["tensors"]:
        for lab, fmt, ex in CODECS:
            if ex:
                expo["m"][lab].append(expansion_exponents(m, fmt))
                expo["v"][lab].append(expansion_exponents(v, fmt))
        u = update_direction(m, v, bc1, bc2, eps)
        sq_ref += float((u.double() ** 2).sum())
        n += u.numel()
        m_q = {lab: roundtrip(m, fmt, ex) for lab, fmt, ex in CODECS}
        v_q = {lab: roundtrip(v, fmt, ex) for lab, fmt, ex in CODECS}
        for lab in labels:
            for key, ref, got in (("m", m, m_q[lab]), ("v", v, v_q[lab])):
                for k, val in moment_stats(ref, got).items():
                    moments[key][lab][k] += val
        per_tensor_mse = {}
        for a in labels:
            for b in labels:
                err = (update_direction(m_q[a], v_q[b], bc1, bc2, eps) - u).double() ** 2
                sq_err[a][b] += float(err.sum())
                sq_err_v_flushed[a][b] += float(err[(v != 0) & (v_q[b] == 0)].sum())
                if a == b and a in ("E4M3", "E4M3+Expand"):
                    per_tensor_mse[a] = float(err.mean())
        per_tensor.append({
            "name": name,
            "shape": list(m.shape),
            "mse_e4m3": per_tensor_mse["E4M3"],
            "mse_e4m3_expand": per_tensor_mse["E4M3+Expand"],
            "v_flushed_e4m3": int(((v != 0) & (v_q["E4M3"] == 0)).sum()),
        })
    rel_norm = math.sqrt(sq_ref)
    return {
        "step": t,
        "n_elements": n,
        "ref_mean_square": sq_ref / n,
        "mse": {a: {b: sq_err[a][b] / n for b in labels} for a in labels},
        "rel": {a: {b: math.sqrt(sq_err[a][b]) / rel_norm for b in labels} for a in labels},
        "share_of_sq_err_from_flushed_v": {
            a: {b: (sq_err_v_flushed[a][b] / sq_err[a][b] if sq_err[a][b] > 0 else 0.0) for b in labels}
            for a in labels
        },
        "moments": {
            key: {
                lab: {
                    "rel_err": math.sqrt(s["sq_err"] / s["sq_ref"]) if s["sq_ref"] > 0 else 0.0,
                    "flushed": s["flushed"],
                    "flushed_fraction": s["flushed"] / s["nonzero"] if s["nonzero"] else 0.0,
                    "median_k": float(torch.cat(expo[key][lab]).median()) if lab in expo[key] else None,
                }
                for lab, s in per.items()
            }
            for key, per in moments.items()
        },
        "per_tensor": per_tensor,
    }


# ------------------------------------------------------------------------------------------------- reporting


def table(values: dict, fmt: str) -> str:
    """4x4 markdown table; rows: first-moment codec, columns: second-moment codec."""
    labels = [c[0] for c in CODECS]
    lines = ["| first \\ second | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for a in labels:
        lines.append(f"| {a} | " + " | ".join(format(values[a][b], fmt) for b in labels) + " |")
    return "\n".join(lines)


def ratio(result: dict) -> float:
    """MSE(E4M3+Expand, E4M3+Expand) / MSE(E4M3, E4M3)."""
    return result["mse"]["E4M3+Expand"]["E4M3+Expand"] / result["mse"]["E4M3"]["E4M3"]


def bulk_ratio(result: dict) -> float:
    """:func:`ratio` with, in each MSE, the squared error of the elements whose v that codec flushed to 0 removed.

    Plain E4M3 flushes a handful of tiny-v entries to 0 (where u_q = m̂_q / eps); they can dominate the pooled MSE.
    """
    def kept(label: str) -> float:
        return result["mse"][label][label] * (1.0 - result["share_of_sq_err_from_flushed_v"][label][label])

    return kept("E4M3+Expand") / kept("E4M3")


def report(result: dict) -> str:
    """Markdown section for one snapshot."""
    labels = [c[0] for c in CODECS]
    moment_rows = [("| codec | m rel. err | m entries flushed to 0 | m median k | v rel. err | v entries flushed to 0 "
                   "| v median k |"), "|---|---|---|---|---|---|---|"]
    for lab in labels:
        mm, vv = result["moments"]["m"][lab], result["moments"]["v"][lab]
        k_m, k_v = (f"{x['median_k']:.4g}" if x["median_k"] is not None else "–" for x in (mm, vv))
        moment_rows.append(f"| {lab} | {mm['rel_err']:.3e} | {mm['flushed']} | {k_m} | {vv['rel_err']:.3e} | "
                           f"{vv['flushed']} | {k_v} |")
    return "\n".join([
        f"### Step {result['step']} ({result['n_elements']:,} elements, mean u² = {result['ref_mean_square']:.4g})",
        "",
        "MSE of m̂/(√v̂+eps), pooled over all elements (rows: first moment, columns: second moment):",
        "",
        table(result["mse"], ".4e"),
        "",
        "MSE divided by MSE(E4M3, E4M3) (the scale-free form that can be set beside the paper's table):",
        "",
        table({r: {c: x / result["mse"]["E4M3"]["E4M3"] for c, x in row.items()} for r, row in result["mse"].items()},
              ".3f"),
        "",
        "Relative error ||u_q − u|| / ||u||:",
        "",
        table(result["rel"], ".4f"),
        "",
        "Share of the squared error from elements whose v was flushed to 0 by the codec:",
        "",
        table(result["share_of_sq_err_from_flushed_v"], ".2%"),
        "",
        ("Each moment alone (relative L2 error; number of non-zero entries decoded as 0; median expansion exponent k "
        "over the groups that are not all zero):"),
        "",
        "\n".join(moment_rows),
        "",
        (f"Ratio MSE(E4M3+Expand, E4M3+Expand) / MSE(E4M3, E4M3) = **{ratio(result):.3f}** "
         "(paper: 12.31 / 20.10 = 0.61)"),
        "",
        f"Same ratio without the elements whose v a codec flushed to 0: {bulk_ratio(result):.3f}",
        "",
    ])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--snapshot-at", type=int, nargs="*", default=[100],
                   help="extra steps at which to evaluate (the final step is always evaluated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=688)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("runs/optimizer_state_error"))
    p.add_argument("--save-states", action="store_true", help="also write the fp32 moments (states_step<t>.pt)")
    args = p.parse_args(argv)
    args.snapshot_at = sorted(s for s in set(args.snapshot_at) if 0 < s < args.steps)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    _, _, snaps, log = train(args)
    t_train = time.perf_counter() - t0
    results = [evaluate(snaps[s], args.beta1, args.beta2, args.eps) for s in sorted(snaps)]
    layouts = [layout_comparison(snaps[s], args.beta1, args.beta2, args.eps) for s in sorted(snaps)]
    t_total = time.perf_counter() - t0
    md = "\n".join(report(r) + "\n" + layout_report(lr) for r, lr in zip(results, layouts))
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "train_seconds": round(t_train, 1),
        "total_seconds": round(t_total, 1),
        "loss_log": log,
        "results": results,
        "layouts": layouts,
        "ratio_by_step": {r["step"]: ratio(r) for r in results},
        "bulk_ratio_by_step": {r["step"]: bulk_ratio(r) for r in results},
    }
    print()
    print(md)
    print(f"train {t_train:.1f} s, total {t_total:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.save_states:
        for step, snap in snaps.items():
            torch.save(snap, args.out / f"states_step{step}.pt")
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
