"""Optimizer-step benchmark at Llama-7B shapes: fp8coat.AdamW against torch's fused AdamW and 8-bit peers.

The parameter set is ``n`` Llama-2-7B decoder layers (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008,
two 4096-element norm weights each); ``n`` is the smallest count reaching ``--params-billion`` (5 layers = 1.01B).
Gradients are fixed random tensors (never zeros). For every optimizer the script reports

* the median step time (CUDA events around each step after a warm-up; ``b2b`` is the mean over the same number
  of steps issued back to back, where host work overlaps the GPU),
* the bytes one step must move at least and the bandwidth this implies, also as a share of a device-to-device copy
  measured in the same run,
* the optimizer-state bytes per parameter and the peak memory.

Bytes per step follow the state layout: every state tensor is read and written once, the parameter storage is read
and written once, the gradient is read once (``2·param + grad + 2·state``). For fp8coat fp32 masters that is, per
element of a large matrix, read p 4 + g 4 + m 1 + v 1, write p 4 + m 1 + v 1, plus 2 x (4 + 1) side bytes per 128
elements read and written; torch fused fp32 reads p, g, m, v (4 each) and writes p, m, v. For torchao and
bitsandbytes the same minimal-traffic model is applied to their state tensors: an approximation of what their
kernels really move.

A separate check (``check_triton_vs_torch``) runs fp8coat's fused Triton step and its torch reference (on the
same device) from identical parameters, gradients and states and reports how often the results agree bit for bit.

Usage::

    python -m benchmarks.bench_optimizer --out $OUT          # on a CUDA GPU, from the repository root
    python -m benchmarks.bench_optimizer --dry-run            # tiny shapes on the CPU, torch reference backend
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback

import torch

import fp8coat
from benchmarks import harness, provenance
from benchmarks.harness import log, problem_lines, sync, time_back_to_back_ms, time_ms
from fp8coat.memory import optimizer_state_bytes
from fp8coat.optim.master_weights import join_bf16_remainder

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.1



# ---------------------------------------------------------------------------------------------------------------
# parameter set


def layer_shapes(hidden: int, ffn: int) -> list[tuple[int, ...]]:
    """Shapes of one Llama decoder layer's weights: 7 matrices and 2 norm weights."""
    return [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]


def model_shapes(params_billion: float, hidden: int, ffn: int, layers: int | None = None) -> list[tuple[int, ...]]:
    """Shapes of the fewest whole layers holding at least ``params_billion`` · 1e9 elements (or ``layers``)."""
    one = layer_shapes(hidden, ffn)
    per_layer = sum(math.prod(s) for s in one)
    if layers is None:
        layers = max(1, math.ceil(params_billion * 1e9 / per_layer))
    return one * layers


def make_params(shapes, dtype, device, seed: int = 0) -> list[torch.nn.Parameter]:
    """Random parameters (std 0.02 matrices, norms near 1) with random gradients of varied row scale."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        if len(shape) == 1:
            p = torch.empty(shape, device=device, dtype=torch.float32).normal_(1.0, 0.05, generator=gen)
        else:
            p = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        p = torch.nn.Parameter(p.to(dtype))
        p.grad = make_grad(shape, dtype, device, gen)
        params.append(p)
    return params


def make_grad(shape, dtype, device, gen) -> torch.Tensor:
    """A random gradient: normal, std 1e-3, times a log-normal scale per row (wide range within a tensor)."""
    g = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, 1e-3, generator=gen)
    if len(shape) >= 2:
        scale = torch.empty((shape[0], 1), device=device, dtype=torch.float32).normal_(0.0, 1.0, generator=gen)
        g.mul_(scale.exp_())
    return g.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers


def time_steps(step, device, warmup: int, steps: int) -> dict:
    """Median ms per step (each step bracketed by events, synchronized), and the back-to-back mean."""
    return {**time_ms(step, device, warmup, steps), "ms_b2b": time_back_to_back_ms(step, device, steps)}


def param_storage_bytes(params) -> tuple[int, int, int]:
    """(numel, parameter bytes, gradient bytes)."""
    numel = sum(p.numel() for p in params)
    pbytes = sum(p.numel() * p.element_size() for p in params)
    gbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    return numel, pbytes, gbytes


def min_traffic_bytes(params, state_bytes: int) -> int:
    """Bytes one step must move at least: parameter read + written, gradient read, state read + written."""
    _, pbytes, gbytes = param_storage_bytes(params)
    return 2 * pbytes + gbytes + 2 * state_bytes


# ---------------------------------------------------------------------------------------------------------------
# benchmark sections


class Bench(harness.Bench):
    """Holds the arguments, the parameter sets and the results; each section is run under ``run_section``."""

    json_name = "bench_optimizer.json"

    def __init__(self, args, meta: dict | None = None):
        super().__init__(args, {"config": vars(args).copy(), "rows": {}, "checks": {}, "errors": {}, "skipped": []},
                         meta)
        self.shapes = model_shapes(args.params_billion, args.hidden, args.ffn, args.layers)
        self.res["config"]["n_tensors"] = len(self.shapes)
        self.res["config"]["numel"] = sum(math.prod(s) for s in self.shapes)
        self._params: dict = {}

    def params(self, dtype) -> list[torch.nn.Parameter]:
        """The benchmark's parameter set in ``dtype`` (one set kept at a time)."""
        if dtype not in self._params:
            self._params.clear()
            self.free()
            t0 = time.time()
            self._params[dtype] = make_params(self.shapes, dtype, self.device)
            sync(self.device)
            log(f"  made {len(self.shapes)} {dtype} params + grads in {time.time() - t0:.1f}s")
        return self._params[dtype]

    def run_section(self, name: str, fn, optional: bool = True) -> None:
        if self.args.sections and name not in self.args.sections:
            return
        self.attempt(name, fn, optional=optional)

    # -- sections ---------------------------------------------------------------------------------------------

    def env(self) -> None:
        import triton

        info = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
        if self.cuda:
            prop = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(), sm=list(torch.cuda.get_device_capability()),
                        mem_gib=round(prop.total_memory / 2**30, 1), sms=prop.multi_processor_count)
        for mod in ("torchao", "bitsandbytes"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception as ex:  # noqa: BLE001
                info[mod] = f"absent ({type(ex).__name__})"
        self.res["env"] = info
        log(info)

    def copy_bandwidth(self) -> None:
        """Device-to-device copy of a large buffer: bytes read + written per second."""
        n = (2 << 30) if self.cuda else (64 << 20)
        src = torch.empty(n, dtype=torch.uint8, device=self.device).random_(0, 255)
        dst = torch.empty_like(src)
        t = time_steps(lambda: dst.copy_(src), self.device, warmup=3, steps=max(10, self.args.steps))
        gbps = 2 * n / t["ms"] / 1e6
        self.res["copy"] = {"bytes": 2 * n, "ms": t["ms"], "GBps": gbps}
        log(f"  copy: {t['ms']:.3f} ms, {gbps:.0f} GB/s")

    def bench_optimizer(self, key: str, dtype, make_opt, note: str = "", fp8coat_opt: bool = False) -> None:
        """Time ``make_opt(params)``'s step on the parameter set in ``dtype`` and record one result row."""
        params = self.params(dtype)
        self.free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        opt = make_opt(params)
        t = time_steps(opt.step, self.device, self.args.warmup, self.args.steps)
        numel = param_storage_bytes(params)[0]
        sbytes = optimizer_state_bytes(opt)
        traffic = min_traffic_bytes(params, sbytes)
        row = {
            "note": note,
            "numel": numel,
            "param_dtype": str(dtype).replace("torch.", ""),
            "state_bytes": sbytes,
            "state_B_per_param": sbytes / numel,
            "bytes_per_step": traffic,
            "GBps": traffic / t["ms"] / 1e6,
            **t,
        }
        if fp8coat_opt:
            row["state_nbytes"] = opt.state_nbytes()
            row["state_nbytes_B_per_param"] = opt.state_nbytes() / numel
            row["fused_launch_caches"] = len(opt._caches)
        if self.cuda:
            row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        copy = self.res.get("copy", {}).get("GBps")
        if copy:
            row["pct_copy"] = 100.0 * row["GBps"] / copy
        self.res["rows"][key] = row
        log(f"  {key}: {t['ms']:.3f} ms/step (b2b {t['ms_b2b']:.3f}, host {t.get('host_ms', 0):.3f}), "
            f"{row['GBps']:.0f} GB/s, "
            f"state {row['state_B_per_param']:.3f} B/param")
        del opt

    # -- optimizers -------------------------------------------------------------------------------------------

    def torch_fused(self, dtype) -> None:
        key = "torch_fused_" + ("fp32" if dtype == torch.float32 else "bf16")
        self.bench_optimizer(
            key, dtype,
            lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True),
            note="states in param dtype",
        )

    def fp8coat_adamw(self, master: str, expansion: bool, kernel_options: dict | None = None) -> None:
        dtype = torch.float32 if master == "fp32" else torch.bfloat16
        key = f"fp8coat_{master}_{'exp' if expansion else 'noexp'}"
        if kernel_options:
            key += "_" + "_".join(f"{k[0]}{v}" for k, v in sorted(kernel_options.items()))
        backend = None if self.cuda else "torch"
        self.bench_optimizer(
            key, dtype,
            lambda ps: fp8coat.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                     master_weights=master, expansion=expansion, backend=backend,
                                     kernel_options=kernel_options),
            note=f"E4M3 m/v, G=128, backend={backend or 'auto'} {kernel_options or ''}", fp8coat_opt=True,
        )

    def torchao(self, which: str) -> None:
        from torchao.optim import AdamW8bit, AdamWFp8

        cls = {"fp8": AdamWFp8, "8bit": AdamW8bit}[which]
        self.bench_optimizer(
            f"torchao_{cls.__name__}_fp32", torch.float32,
            lambda ps: cls(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
            note="block 256, per-param torch.compile; bytes approximate",
        )

    def bnb(self) -> None:
        import bitsandbytes as bnb

        self.bench_optimizer(
            "bnb_AdamW8bit_fp32", torch.float32,
            lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
            note="blockwise dynamic 8-bit; bytes approximate",
        )

    def check(self) -> None:
        layers = self.args.check_layers
        one = layer_shapes(self.args.hidden, self.args.ffn)
        shapes = one * layers
        backend = "triton" if (self.cuda or os.environ.get("TRITON_INTERPRET") == "1") else "torch"
        for master, expansion in (("fp32", False), ("fp32", True), ("bf16-remainder", True)):
            key = f"{master}_{'exp' if expansion else 'noexp'}"
            t0 = time.time()
            try:
                r = check_triton_vs_torch(shapes, self.device, master, expansion, backend=backend,
                                          warm_steps=self.args.check_steps)
            except Exception as ex:  # noqa: BLE001
                self.res["errors"]["check_" + key] = repr(ex)[:500]
                log(f"  check {key} FAILED: {ex!r}")
                traceback.print_exc()
                continue
            r["seconds"] = time.time() - t0
            self.res["checks"][key] = r
            log(f"  check {key}: {json.dumps(r['summary'])}")
            self.free()


# ---------------------------------------------------------------------------------------------------------------
# correctness: fused Triton step vs torch reference


def _fp8_ordinal(q: torch.Tensor) -> torch.Tensor:
    """FP8 codes as signed ordinals: adjacent representable values differ by 1 (same sign), ±0 -> 0."""
    u = q.view(torch.uint8).to(torch.int32)
    mag = u & 0x7F
    return torch.where(u >= 0x80, -mag, mag)


class _Tally:
    """Counts of equal elements, worst differences, summed over tensors for one state key."""

    def __init__(self):
        self.n = 0
        self.eq = 0
        self.max_abs = 0.0
        self.max_code_step = 0
        self.over_one_step = 0

    def add_bits(self, a: torch.Tensor, b: torch.Tensor) -> None:
        ia = a.contiguous().view(_int_of(a)).reshape(-1)
        ib = b.contiguous().view(_int_of(b)).reshape(-1)
        self.n += ia.numel()
        self.eq += int((ia == ib).sum())
        if a.is_floating_point():
            d = (a.float() - b.float()).abs()
            d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
            self.max_abs = max(self.max_abs, float(d.max()) if d.numel() else 0.0)
        else:
            d = (a.to(torch.int32) - b.to(torch.int32)).abs()
            self.max_abs = max(self.max_abs, float(d.max()) if d.numel() else 0.0)

    def add_codes(self, a: torch.Tensor, b: torch.Tensor) -> None:
        oa, ob = _fp8_ordinal(a).reshape(-1), _fp8_ordinal(b).reshape(-1)
        step = (oa - ob).abs()
        self.n += oa.numel()
        self.eq += int((a.view(torch.uint8) == b.view(torch.uint8)).sum())
        if step.numel():
            self.max_code_step = max(self.max_code_step, int(step.max()))
        self.over_one_step += int((step > 1).sum())

    def as_dict(self) -> dict:
        out = {"n": self.n, "eq_frac": self.eq / max(self.n, 1), "max_abs": self.max_abs}
        if self.max_code_step or self.over_one_step:
            out.update(max_code_step=self.max_code_step, over_one_step=self.over_one_step)
        return out


def _int_of(t: torch.Tensor) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def compare_optimizers(pa, oa, pb, ob) -> dict:
    """Per state key (and 'param' = the fp32 master value), agreement of optimizer ``oa`` with ``ob``."""
    tallies: dict[str, _Tally] = {}
    for a, b in zip(pa, pb):
        sa, sb = oa.state[a], ob.state[b]
        if "master_remainder" in sa:
            ma = join_bf16_remainder(a.detach(), sa["master_remainder"])
            mb = join_bf16_remainder(b.detach(), sb["master_remainder"])
        else:
            ma, mb = a.detach(), b.detach()
        tallies.setdefault("param", _Tally()).add_bits(ma, mb)
        for key, va in sa.items():
            if key in ("step", "master_remainder"):
                continue
            vb = sb[key]
            quantized = va.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            name = key + ("" if quantized or key.endswith(("_absmax", "_expo")) else "_fp32")
            t = tallies.setdefault(name, _Tally())
            if quantized:
                t.add_codes(va, vb)
            else:
                t.add_bits(va, vb)
    return {k: v.as_dict() for k, v in sorted(tallies.items())}


def check_triton_vs_torch(shapes, device, master: str, expansion: bool, *, backend: str = "triton",
                          warm_steps: int = 2, seed: int = 1) -> dict:
    """Compare fp8coat.AdamW ``backend`` against ``backend='torch'`` (both on ``device``).

    Phase ``from_scratch``: both start from the same parameters and zero states and take ``warm_steps`` steps
    with the same fresh gradients. Phase ``one_step``: the Triton optimizer is then loaded with the torch one's
    parameters and state (identical non-trivial states) and both take one more step with the same gradient.
    Expansion off: every result should be bit-identical. Expansion on: FP8 codes equal in >= 99.9% of elements,
    the others one code step apart (log2/exp2 may differ in the last bit).
    """
    dtype = torch.float32 if master == "fp32" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    base = make_params(shapes, dtype, device, seed=seed)
    pa = [torch.nn.Parameter(p.detach().clone()) for p in base]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in base]
    del base
    kw = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY, "master_weights": master,
          "expansion": expansion}
    oa = fp8coat.AdamW(pa, backend=backend, **kw)
    ob = fp8coat.AdamW(pb, backend="torch", **kw)

    def step_both(oa, pa):
        grads = [make_grad(tuple(p.shape), dtype, device, gen) for p in pb]
        for p, g in zip(pa, grads):
            p.grad = g
        for p, g in zip(pb, grads):
            p.grad = g
        oa.step()
        ob.step()

    for _ in range(warm_steps):
        step_both(oa, pa)
    sync(device)
    scratch = compare_optimizers(pa, oa, pb, ob)

    pa2 = [torch.nn.Parameter(p.detach().clone()) for p in pb]
    oa2 = fp8coat.AdamW(pa2, backend=backend, **kw)
    oa2.load_state_dict(copy.deepcopy(ob.state_dict()))  # deep copy: no state tensor shared with ob
    del oa, pa
    step_both(oa2, pa2)
    sync(device)
    one = compare_optimizers(pa2, oa2, pb, ob)

    codes = [v for k, v in one.items() if k in ("exp_avg", "exp_avg_sq")]
    code_eq = min((v["eq_frac"] for v in codes), default=1.0)
    code_step = max((v.get("max_code_step", 0) for v in codes), default=0)
    all_eq = all(v["eq_frac"] == 1.0 for v in one.values())
    ok = all_eq if not expansion else (code_eq >= 0.999 and code_step <= 1)
    summary = {
        "backend": backend,
        "ok": ok,
        "all_bit_identical": all_eq,
        "code_eq_min": code_eq,
        "max_code_step": code_step,
        "param_eq": one["param"]["eq_frac"],
        "param_max_abs": one["param"]["max_abs"],
        "scratch_code_eq_min": min((v["eq_frac"] for k, v in scratch.items() if k in ("exp_avg", "exp_avg_sq")),
                                   default=1.0),
        "scratch_param_eq": scratch["param"]["eq_frac"],
    }
    return {"summary": summary, "one_step": one, "from_scratch": scratch,
            "numel": sum(math.prod(s) for s in shapes), "warm_steps": warm_steps}


# ---------------------------------------------------------------------------------------------------------------
# report


def table(res: dict) -> str:
    """Compact markdown tables of the timing rows and the checks."""
    copy = res.get("copy", {}).get("GBps")
    lines = [f"copy bandwidth: {copy:.0f} GB/s" if copy else "copy bandwidth: n/a", ""]
    lines.append("| optimizer | params | dtype | ms/step | b2b ms | host ms | GB/s | % copy | state B/param "
                 "| peak GiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in res["rows"].items():
        pct = f"{r['pct_copy']:.0f}%" if "pct_copy" in r else "-"
        peak = f"{r['peak_GiB']:.1f}" if "peak_GiB" in r else "-"
        lines.append(
            f"| {key} | {r['numel'] / 1e9:.3f}B | {r['param_dtype']} | {r['ms']:.2f} | {r['ms_b2b']:.2f} | "
            f"{r.get('host_ms', float('nan')):.2f} | "
            f"{r['GBps']:.0f} | {pct} | {r['state_B_per_param']:.3f} | {peak} |"
        )
    if res["checks"]:
        lines += ["", "| check (triton vs torch) | ok | bit-identical | code eq (min) | max code step | param eq |",
                  "|---|---|---|---|---|---|"]
        for key, c in res["checks"].items():
            s = c["summary"]
            lines.append(f"| {key} ({s['backend']}) | {s['ok']} | {s['all_bit_identical']} | "
                         f"{s['code_eq_min']:.6f} | {s['max_code_step']} | {s['param_eq']:.6f} |")
    lines += problem_lines(res, "skipped (package absent or time budget)")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(
        ap, steps=15, steps_help="timed steps (>= 10 recommended)", budget_s=240.0,
        budget_help="optional sections start only before this",
        sections_help="comma list of section names to run (default: all)",
        dry_run_help="tiny shapes on the CPU with the torch backend")
    ap.add_argument("--params-billion", type=float, default=1.0, help="parameter count to reach (whole layers)")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (overrides --params-billion)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--check-layers", type=int, default=1, help="layers of the triton-vs-torch check")
    ap.add_argument("--check-steps", type=int, default=2, help="steps before the one-step comparison")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.hidden, args.ffn, args.layers = 128, 344, args.layers or 1
        args.steps, args.warmup = min(args.steps, 2), 1
        args.check_layers = 1
    return harness.finish_args(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    b = Bench(args, provenance.run_meta("benchmarks.bench_optimizer", argv))
    log(f"params: {b.res['config']['numel'] / 1e9:.4f}B in {len(b.shapes)} tensors on {args.device}")

    def runs():
        # most important first: optional sections are skipped once --budget-s has passed
        b.run_section("env", b.env, optional=False)
        b.run_section("copy", b.copy_bandwidth, optional=False)
        b.run_section("torch_fused_fp32", lambda: b.torch_fused(torch.float32), optional=False)
        b.run_section("fp8coat_fp32_exp", lambda: b.fp8coat_adamw("fp32", True), optional=False)
        b.run_section("fp8coat_fp32_noexp", lambda: b.fp8coat_adamw("fp32", False))
        # candidates (default: 8 groups of 128 per program, 4 warps; with expansion approximate sqrt/div + FMA)
        for opts in ({"exact_math": True}, {"block_groups": 16}, {"block_groups": 16, "num_warps": 8},
                     {"block_groups": 4}):
            tag = "_".join(f"{k}{v}" for k, v in opts.items())
            b.run_section(f"fp8coat_fp32_exp_{tag}", lambda o=opts: b.fp8coat_adamw("fp32", True, o))
        b.run_section("fp8coat_fp32_noexp_approx", lambda: b.fp8coat_adamw("fp32", False, {"exact_math": False}))
        b.run_section("bnb_AdamW8bit", b.bnb)
        b.run_section("torch_fused_bf16", lambda: b.torch_fused(torch.bfloat16))
        b.run_section("fp8coat_bf16-remainder_exp", lambda: b.fp8coat_adamw("bf16-remainder", True))
        b.run_section("fp8coat_bf16-stochastic_exp", lambda: b.fp8coat_adamw("bf16-stochastic", True))
        for opts in ({"num_warps": 8}, {"block_groups": 16, "num_warps": 8}, {"block_groups": 4}):
            tag = "_".join(f"{k}{v}" for k, v in opts.items())
            b.run_section(f"fp8coat_bf16-stochastic_exp_{tag}",
                          lambda o=opts: b.fp8coat_adamw("bf16-stochastic", True, o))
        b._params.clear()
        b.run_section("check", b.check)
        b.run_section("torchao_AdamWFp8", lambda: b.torchao("fp8"))
        b.run_section("torchao_AdamW8bit", lambda: b.torchao("8bit"))

    b.main_loop(runs)
    b.finish("bench_optimizer", table(b.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
