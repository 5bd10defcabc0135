"""FP8 linear, decoder layer and 4-layer model training at Llama-7B shapes: fp8coat against BF16 and torchao float8.

All variants are measured in one run, so the ratios compare numbers taken on the same machine at the same time.

Sections (each variant is one row; ratios are against the BF16 row of the same section):

* ``linear``: one linear layer's forward + backward (``dX`` and ``dW``) on 8192 tokens at (4096→4096),
  (4096→11008), (11008→4096), and q/k/v sharing one input (three 4096×4096 weights). BF16 is
  ``torch.nn.functional.linear``; ``fp8`` is ``fp8coat.ops.linear.linears`` with one ``FP8WeightCache`` per weight,
  cleared before every step (the weight changes at every optimizer step, so it is quantized once per step);
  ``fp8_cached`` keeps the cache (micro-batches between two optimizer steps). Median ms, TFLOP/s (6·M·N·K per
  forward + backward) and the relative error of y, dX, dW against BF16. Three timings: each call synchronized
  (host latency included: the GPU idles while the first kernels are launched), calls queued back to back (the host
  runs ahead, as between the layers of a training step) and CUDA-graph replays of one fwd+bwd (launch gaps
  removed: the device-side cost).
* ``layer``: one Llama-2-7B decoder layer (hidden 4096, 32 heads, MHA, intermediate 11008, sdpa, bf16 parameters),
  input (4, 2048, 4096) bf16 requiring grad. Median fwd+bwd ms; bytes saved for backward by unique storage
  (``fp8coat.memory.measure_saved_tensors``, parameters apart; eager variants only: its module hooks would make a
  compiled module recompile); ``torch.cuda.memory_allocated`` after the forward minus before, the output excluded,
  and the fwd+bwd peak above the same baseline. The recipes' defaults: no FP8 weight copies kept, each weight
  quantized in every forward (with ``cache_fp8_weights`` on, the caches would be cleared before every timed step:
  weights quantized once per step, as in training; ``weight_cache_bytes`` records what they hold). U = B·S·H·2
  bytes, one bf16 activation of hidden size.
  Variants: BF16 eager / compiled, torchao float8 (tensorwise) compiled, fp8coat ``fp8-linear`` eager, ``coat``
  eager / compiled.
* ``model4``: a 4-layer Llama-7B-shaped ``LlamaForCausalLM`` (vocab 32000, ``use_cache=False``), batch 4 × 2048,
  one fixed batch of random tokens, training steps as in the anchor script (``anchors_4layer.py``): tok/s from the
  median step time (host clock, synchronized), peak ``max_memory_allocated`` (reset after the model is built, so
  parameters count), final loss. Anchors: BF16 AMP eager (and compiled) + fused AdamW (fp32 parameters), torchao
  float8 compiled + torchao AdamWFp8 (fp32 parameters, autocast). fp8coat: bf16 parameters, no autocast,
  ``fp8coat.AdamW`` (``bf16-remainder`` masters, or ``bf16-stochastic``), ``coat`` eager / compiled and
  ``fp8-linear`` eager, with the recipes' defaults (no FP8 weight copies kept; each row records
  ``cache_fp8_weights``).

model4's compiled runs compile each decoder layer (``--compile layers``, the default: quicker to compile; the
embedding, LM head and loss stay eager) or the whole model (``--compile model``, as the anchor script did).
Runs are ordered by importance; optional runs start only while the elapsed time plus their estimated cost is within
``--budget-s``. JSON (``bench_layers.json``) is rewritten under ``--out`` after every run; a compact table is
printed last.

Usage::

    python -m benchmarks.bench_layers --out $OUT --budget-s 270       # on a CUDA GPU, from the repository root
    python -m benchmarks.bench_layers --dry-run                         # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fp8coat
from benchmarks import harness, provenance
from benchmarks.harness import fmt, graph_replay_ms, log, problem_lines, sync, time_back_to_back_ms, time_ms
from benchmarks.report import TARGET_PEAK_GIB, TARGET_TOK_S  # model4 targets for fp8coat
from fp8coat.compiling import compile_layers
from fp8coat.conversion import weight_caches
from fp8coat.memory import measure_saved_tensors
from fp8coat.ops.linear import FP8WeightCache, linears

GIB = 2**30
LR = 1e-5  # as the anchor script
COMPILE_COST_S = 45.0  # estimated seconds a compiled run needs beyond an eager one (compilation)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def llama_config(args, layers: int):
    """Llama-2-7B proportions (MHA) at ``args``' sizes; sdpa attention, no KV cache."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=max(4096, args.seq), use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def compile_fn(module: torch.nn.Module, mode: str, layers=None):
    """``torch.compile`` the module whole (``mode='model'``) or each of ``layers`` in place (``'layers'``)."""
    if mode == "model" or layers is None:
        return torch.compile(module)
    compile_layers(layers)  # layer.compile() on each: converted layers share one compiled code
    return module


class Bench(harness.Bench):
    """Arguments, results and the run bookkeeping; every variant runs under :meth:`run`."""

    json_name = "bench_layers.json"

    def __init__(self, args, meta: dict | None = None):
        super().__init__(args, {"config": vars(args).copy(), "rows": {"linear": {}, "layer": {}, "model4": {}},
                                "saved_tables": {}, "errors": {}, "skipped": []}, meta)

    def run(self, section: str, key: str, fn, optional: bool = True, compiled: bool = False) -> None:
        """Run one variant: skipped when its section is not selected, when it is compiled and compilation is
        off, or (optional runs) when the budget would be exceeded; exceptions are recorded, never raised."""
        if self.args.sections and section not in self.args.sections and section != "env":
            return
        if self.args.only and key not in self.args.only and section != "env":
            return
        name = f"{section}/{key}"
        if compiled and self.args.compile == "none":
            self.res["skipped"].append(f"{name} (compile off)")
            return

        def on_oom():
            self.res["rows"][section][key] = {"oom": True}

        def cleanup():
            if compiled:
                torch._dynamo.reset()  # drop compiled graphs (and what they reference) before the next variant

        self.attempt(name, fn, optional=optional, cost_s=COMPILE_COST_S if compiled and self.cuda else 0.0,
                     on_oom=on_oom, cleanup=cleanup)

    # -- env --------------------------------------------------------------------------------------------------

    def env(self) -> None:
        import transformers
        import triton

        info = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0]}
        if self.cuda:
            info.update(gpu=torch.cuda.get_device_name(), sm=list(torch.cuda.get_device_capability()))
        try:
            info["torchao"] = __import__("torchao").__version__
        except Exception as ex:  # noqa: BLE001
            info["torchao"] = f"absent ({type(ex).__name__})"
        self.res["env"] = info
        log(info)

    # -- linear -----------------------------------------------------------------------------------------------

    def linear(self, key: str, k: int, n: int, count: int) -> None:
        """BF16 vs FP8 forward + backward of ``count`` (N×K) weights on one (M×K) input; three rows."""
        a, dev, m = self.args, self.device, self.args.tokens
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
        ws = [(torch.randn(n, k, device=dev, generator=gen) * k**-0.5).to(torch.bfloat16).requires_grad_()
              for _ in range(count)]
        dys = [torch.randn(m, n, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(count)]
        caches = [FP8WeightCache() for _ in range(count)]

        def fwd_bf16(x=x, ws=ws):
            return [F.linear(x, w) for w in ws]

        def fwd_fp8(clear: bool, x=x, ws=ws):
            if clear:
                for c in caches:
                    c.clear()
            return linears(x, ws, caches=caches)

        def step(fwd, x=x, ws=ws):
            return torch.autograd.grad(fwd(x=x, ws=ws), [x, *ws], dys)

        def graph_ms(fwd) -> float | None:
            # fresh leaves (same storage): their gradient-accumulator nodes are then created on the capture stream;
            # the ones of x and ws, made on the default stream and kept alive, invalidate a capture on another stream
            gx = x.detach().requires_grad_()
            gws = [w.detach().requires_grad_() for w in ws]
            return graph_replay_ms(lambda: step(fwd, gx, gws), 10)

        variants = {"bf16": fwd_bf16, "fp8": lambda **kw: fwd_fp8(True, **kw),
                    "fp8_cached": lambda **kw: fwd_fp8(False, **kw)}
        flops = 6 * m * n * k * count
        ref = None
        for impl, fwd in variants.items():
            t = time_ms(lambda fwd=fwd: step(fwd), dev, a.warmup, a.steps)
            tf = time_ms(fwd, dev, a.warmup, a.steps)
            row = {"shape": key, "impl": impl, "M": m, "K": k, "N": n, "count": count, "ms": t["ms"],
                   "ms_min": t["ms_min"], "ms_max": t["ms_max"], "fwd_ms": tf["ms"],
                   "TFLOPs": flops / t["ms"] / 1e9}
            if self.cuda:  # calls queued back to back (the host runs ahead, as in training) and graph replays
                row["b2b_ms"] = statistics.median(time_back_to_back_ms(lambda fwd=fwd: step(fwd), dev, 10)
                                                  for _ in range(5))
                # a CUDA graph always quantizes the weight (FP8WeightCache is bypassed while capturing: replays must
                # see weight updates), so the cached variant has no graph timing of its own
                row["graph_ms"] = graph_ms(fwd) if impl != "fp8_cached" else None
            ys = fwd()
            grads = torch.autograd.grad(ys, [x, *ws], dys)
            out = [y.detach() for y in ys] + list(grads)
            del ys, grads  # the autograd graph must not outlive the row (see graph_ms)
            if ref is None:
                ref = out
            else:
                n_y = len(ws)
                row["err_y"] = max(rel_err(o, r) for o, r in zip(out[:n_y], ref[:n_y]))
                row["err_dx"] = rel_err(out[n_y], ref[n_y])
                row["err_dw"] = max(rel_err(o, r) for o, r in zip(out[n_y + 1:], ref[n_y + 1:]))
            row["ref"] = f"{key} bf16"
            self.res["rows"]["linear"][f"{key} {impl}"] = row
            log(f"  {key} {impl}: {t['ms']:.3f} ms fwd+bwd ({tf['ms']:.3f} fwd), {row['TFLOPs']:.1f} TFLOP/s"
                + (f", err y {row['err_y']:.2e} dx {row['err_dx']:.2e} dw {row['err_dw']:.2e}" if "err_y" in row
                   else ""))

    # -- layer ------------------------------------------------------------------------------------------------

    def layer(self, key: str, recipe: str | None = None, torchao: bool = False, compiled: bool = False) -> None:
        """One decoder layer: fwd+bwd time, bytes saved for backward, activation memory after the forward."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        a, dev = self.args, self.device
        cfg = llama_config(a, 1)
        torch.manual_seed(0)
        with torch.device(dev):
            layer = LlamaDecoderLayer(cfg, layer_idx=0)
            rope = LlamaRotaryEmbedding(cfg)
        layer = layer.to(torch.bfloat16).train()
        if recipe is not None:
            fp8coat.convert(torch.nn.ModuleList([layer]), recipe)  # convert() works below a ModuleList
        if torchao:
            from torchao.float8 import convert_to_float8_training

            convert_to_float8_training(layer)
        fn = torch.compile(layer) if compiled else layer
        gen = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(a.batch, a.seq, a.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        x.requires_grad_()
        dy = torch.randn(a.batch, a.seq, a.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        with torch.no_grad():
            pe = rope(x, torch.arange(a.seq, device=dev)[None])
        unit = a.batch * a.seq * a.hidden * 2

        def forward():
            out = fn(x, position_embeddings=pe)
            return out[0] if isinstance(out, tuple) else out

        caches = weight_caches(layer)

        def step():
            for c in caches:  # weights change at every optimizer step: quantize them once per step
                c.clear()
            forward().backward(dy)
            x.grad = None
            layer.zero_grad(set_to_none=True)

        t0 = time.time()
        step()
        sync(dev)
        first_s = time.time() - t0
        t = time_ms(step, dev, a.warmup, a.steps)
        row = {"recipe": recipe or ("torchao-float8" if torchao else "bf16"), "compiled": compiled,
               "ms": t["ms"], "ms_min": t["ms_min"], "ms_max": t["ms_max"], "first_step_s": first_s,
               "U_bytes": unit, "ref": "bf16"}

        if self.cuda:  # activation memory: allocated after the forward minus before, the output excluded
            self.free()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = forward()
            sync(dev)
            after = torch.cuda.memory_allocated()
            out.backward(dy)
            sync(dev)
            peak = torch.cuda.max_memory_allocated()
            act = after - before - out.numel() * out.element_size()
            row.update(mem_fwd_bytes=act, mem_fwd_U=act / unit, mem_fwd_GiB=act / GIB,
                       peak_fwd_bwd_GiB=(peak - before) / GIB)
            del out
            x.grad = None
            layer.zero_grad(set_to_none=True)
        row["weight_cache_bytes"] = sum(c.nbytes for c in caches)

        if not compiled:  # bytes saved for backward, unique storages, parameters apart
            out, rep = measure_saved_tensors(forward, modules=layer)
            del out
            row.update(saved_bytes=rep.total_bytes, saved_U=rep.total_bytes / unit, saved_GiB=rep.total_bytes / GIB,
                       saved_by_op={k: v / unit for k, v in sorted(rep.by_op.items(), key=lambda kv: -kv[1])})
            if key in ("bf16", "fp8coat_coat"):
                table = rep.table(unit)
                self.res["saved_tables"][key] = table
                log(f"  saved for backward, {key} (U = {unit:,} bytes):\n{table}")
        self.res["rows"]["layer"][key] = row
        log(f"  {key}: {t['ms']:.2f} ms fwd+bwd (first step {first_s:.1f}s)"
            + (f", saved {row['saved_U']:.2f} U" if "saved_U" in row else "")
            + (f", mem after fwd {row['mem_fwd_U']:.2f} U, peak {row['peak_fwd_bwd_GiB']:.2f} GiB"
               if "mem_fwd_U" in row else ""))

    # -- model4 -----------------------------------------------------------------------------------------------

    def train(self, key: str, make_opt, *, recipe: str | None = None, torchao: bool = False,
              compiled: bool = False, amp: bool = False, param_dtype=torch.float32, ref: str = "bf16amp_eager",
              chunked_loss: bool = False, in_backward: bool | str = False, loss_chunk: int | None = None) -> None:
        """Training steps of the 4-layer model: tok/s, peak memory, final loss. ``chunked_loss``: the LM head and
        cross-entropy through ``fp8coat.ops.cross_entropy.linear_cross_entropy`` (no fp32 logits kept), in chunks
        of ``loss_chunk`` tokens (default: its own choice)."""
        from transformers import LlamaForCausalLM

        from fp8coat.ops.cross_entropy import linear_cross_entropy

        a, dev = self.args, self.device
        cfg = llama_config(a, a.layers)
        self.free()
        # memory still held by earlier runs of this process: subtracted from every figure below
        leftover = torch.cuda.memory_allocated() if self.cuda else 0
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
        model.to(param_dtype).train()
        if recipe is not None:
            fp8coat.convert(model, recipe)
        if torchao:
            from torchao.float8 import convert_to_float8_training

            convert_to_float8_training(model, module_filter_fn=lambda m, n: "lm_head" not in n)
        fn = compile_fn(model, a.compile, model.model.layers) if compiled else model
        opt = make_opt(model.parameters())
        # opt.step() below then finds no gradients; "serial": the updates on the backward's own stream
        hooks = fp8coat.StepInBackward(opt, overlap=in_backward != "serial") if in_backward else None
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
        self.free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()  # the peak starts at what is allocated now: the parameters

        def forward_loss() -> torch.Tensor:
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=amp):
                if chunked_loss:
                    hidden = fn.model(input_ids=ids, use_cache=False).last_hidden_state
                    return linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], chunk=loss_chunk)
                return fn(input_ids=ids, labels=ids, use_cache=False).loss

        phase_ms: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

        def step() -> float:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.cuda else None
            if ev:
                ev[0].record()
            loss = forward_loss()
            if ev:
                ev[1].record()
            loss.backward()
            if ev:
                ev[2].record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ev:
                ev[3].record()
            return loss, ev

        times, losses = [], []
        for i in range(a.warmup + a.steps):
            sync(dev)
            t0 = time.perf_counter()
            loss, ev = step()
            sync(dev)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if ev and i >= a.warmup:  # device time between the phase boundaries (launch gaps included)
                for j, phase in enumerate(phase_ms):
                    phase_ms[phase].append(ev[j].elapsed_time(ev[j + 1]))
        st = statistics.median(times[a.warmup:])
        tokens = a.batch * a.seq
        row = {"step_s": st, "tok_per_s": tokens / st, "first_step_s": times[0], "loss_first": losses[0],
               "loss": losses[-1], "compiled": compiled, "compile_mode": a.compile if compiled else None,
               "param_dtype": str(param_dtype).replace("torch.", ""), "amp": amp, "optimizer": type(opt).__name__,
               "ref": ref, "n_params": sum(p.numel() for p in model.parameters()), "chunked_loss": chunked_loss,
               "loss_chunk": loss_chunk, "step_in_backward": in_backward,
               # the recipe's own value (None: no fp8coat conversion, or an fp8coat without the option)
               "cache_fp8_weights": getattr(fp8coat.get_recipe(recipe), "cache_fp8_weights", None) if recipe else None}
        if self.cuda:
            row["ms_by_phase"] = {k: statistics.median(v) for k, v in phase_ms.items()}
        if self.cuda:
            row["peak_GiB"] = (torch.cuda.max_memory_allocated() - leftover) / GIB
            row["leftover_GiB"] = leftover / GIB
            # one more step, phase by phase: what is resident before it and the peak inside each phase
            row["resident_GiB"] = (torch.cuda.memory_allocated() - leftover) / GIB
            phases = {}
            for phase in ("forward", "backward", "optimizer"):
                torch.cuda.reset_peak_memory_stats()
                if phase == "forward":
                    loss = forward_loss()
                elif phase == "backward":
                    loss.backward()
                else:
                    opt.step()
                sync(dev)
                phases[phase] = (torch.cuda.max_memory_allocated() - leftover) / GIB
            opt.zero_grad(set_to_none=True)
            del loss
            row["peak_by_phase_GiB"] = phases
            log(f"  {key}: resident {row['resident_GiB']:.2f} GiB (+{row['leftover_GiB']:.2f} left by earlier runs, "
                "not counted); peak by phase "
                + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        if hooks is not None:
            hooks.remove()
        self.res["rows"]["model4"][key] = row
        log(f"  {key}: {row['tok_per_s']:,.0f} tok/s, step {st * 1e3:.1f} ms (first {times[0]:.1f}s)"
            + (f", peak {row['peak_GiB']:.2f} GiB" if "peak_GiB" in row else "")
            + f", loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            + ("; ms forward / backward / optimizer " + " / ".join(f"{v:.1f}" for v in row["ms_by_phase"].values())
               if "ms_by_phase" in row else ""))


# ---------------------------------------------------------------------------------------------------------------
# report


def table(res: dict) -> str:
    """Compact markdown tables of the three sections, the target check, errors and skipped runs."""
    lines = []
    rows = res["rows"]
    if rows["linear"]:
        lines += ["linear (fwd+bwd = y, dX, dW; M = tokens)",
                  ("| shape | impl | fwd ms | fwd+bwd ms | TFLOP/s | x vs bf16 | back to back ms | x | graph replay ms "
                   "| x | err y / dX / dW |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in rows["linear"].items():
            if r.get("oom"):
                lines.append(f"| {key} | out of memory ||||||")
                continue
            base = rows["linear"].get(r.get("ref"), {})
            ratio = base["ms"] / r["ms"] if "ms" in base and "ms" in r else None
            err = (f"{r['err_y']:.1e} / {r['err_dx']:.1e} / {r['err_dw']:.1e}" if "err_y" in r else "-")
            extra = []
            for col in ("b2b_ms", "graph_ms"):
                x = base[col] / r[col] if r.get(col) and base.get(col) else None
                extra += [fmt(r.get(col), ".3f"), fmt(x, ".2f")]
            lines.append(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['ms']:.3f} | {r['TFLOPs']:.1f} | "
                         f"{fmt(ratio, '.2f')} | {' | '.join(extra)} | {err} |")
        lines.append("")
    if rows["layer"]:
        lines += ["layer (one decoder layer; U = B*S*H*2 bytes)",
                  ("| variant | fwd+bwd ms | x vs bf16 | saved U | saved GiB | mem after fwd U | GiB "
                   "| fwd+bwd peak GiB | first step s |"), "|---|---|---|---|---|---|---|---|---|"]
        base = rows["layer"].get("bf16", {})
        for key, r in rows["layer"].items():
            if r.get("oom"):
                lines.append(f"| {key} | out of memory |||||||")
                continue
            ratio = base["ms"] / r["ms"] if "ms" in base else None
            lines.append(f"| {key} | {r['ms']:.2f} | {fmt(ratio, '.2f')} | {fmt(r.get('saved_U'), '.2f')} | "
                         f"{fmt(r.get('saved_GiB'), '.3f')} | {fmt(r.get('mem_fwd_U'), '.2f')} | "
                         f"{fmt(r.get('mem_fwd_GiB'), '.3f')} | {fmt(r.get('peak_fwd_bwd_GiB'), '.2f')} | "
                         f"{r['first_step_s']:.1f} |")
        lines.append("")
    if rows["model4"]:
        lines += ["model4 (4-layer Llama-7B shape, bs x seq tokens per step)",
                  ("| run | tok/s | x vs bf16 eager | x vs torchao | peak GiB | loss first -> last | step ms "
                   "| fwd / bwd / opt ms | first step s |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        m = rows["model4"]
        b_ref = m.get("bf16amp_eager", {}).get("tok_per_s")
        t_ref = m.get("torchao_fp8_compiled_adamwfp8", {}).get("tok_per_s")
        for key, r in m.items():
            if r.get("oom"):
                lines.append(f"| {key} | out of memory |||||||")
                continue
            tps = r["tok_per_s"]
            lines.append(f"| {key} | {tps:,.0f} | {fmt(tps / b_ref if b_ref else None, '.2f')} | "
                         f"{fmt(tps / t_ref if t_ref else None, '.2f')} | {fmt(r.get('peak_GiB'), '.2f')} | "
                         f"{r['loss_first']:.3f} -> {r['loss']:.3f} | {r['step_s'] * 1e3:.1f} | "
                         f"{' / '.join(f'{v:.1f}' for v in r.get('ms_by_phase', {}).values()) or '-'} | "
                         f"{r['first_step_s']:.1f} |")
        ours = {k: r for k, r in m.items() if k.startswith("fp8coat") and not r.get("oom")}
        for k, r in ours.items():
            ok_t = r["tok_per_s"] >= TARGET_TOK_S
            ok_m = r.get("peak_GiB") is not None and r["peak_GiB"] <= TARGET_PEAK_GIB
            lines.append(f"target {k}: tok/s {r['tok_per_s']:,.0f} {'>=' if ok_t else '<'} {TARGET_TOK_S:,.0f} "
                         f"[{'ok' if ok_t else 'MISS'}], peak {fmt(r.get('peak_GiB'), '.2f', 'n/a')} GiB "
                         f"{'<=' if ok_m else 'vs'} {TARGET_PEAK_GIB} [{'ok' if ok_m else 'MISS'}]")
    lines += problem_lines(res)
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(
        ap, steps=10, steps_help="timed iterations / training steps (median)", budget_s=270.0,
        budget_help="optional runs start only within this",
        sections_help="comma list of linear,layer,model4 (default: all)",
        dry_run_help="tiny shapes on the CPU (hidden 128, 2 heads, ffn 344, seq 64, batch 2), compiled runs off")
    ap.add_argument("--only", default="", help="comma list of row keys to run (default: all rows of the sections)")
    ap.add_argument("--compile", choices=("layers", "model", "none"), default=None,
                    help="model4 compiled runs: per decoder layer (default), the whole model, or none (no compiled "
                         "runs; the default with --dry-run)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the model4 section")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.hidden, args.heads, args.ffn, args.vocab, args.batch, args.seq = 128, 2, 344, 1000, 2, 64
        args.steps, args.warmup = min(args.steps, 2), 1
    harness.finish_args(args)
    args.compile = args.compile or ("none" if args.dry_run else "layers")
    args.tokens = args.batch * args.seq
    args.only = [s for s in args.only.split(",") if s]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    b = Bench(args, provenance.run_meta("benchmarks.bench_layers", argv))
    h, f = args.hidden, args.ffn
    log(f"bench_layers on {args.device}: hidden {h}, heads {args.heads}, ffn {f}, batch {args.batch} x seq "
        f"{args.seq}, {args.steps} timed after {args.warmup} warm-up, compile={args.compile}, budget {args.budget_s}s")

    for name in ("recompile_limit", "cache_size_limit"):  # one entry per recipe and call site; never fall back
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
            break

    def fp8coat_adamw(master="auto"):
        return lambda ps: fp8coat.AdamW(ps, lr=LR, master_weights=master)

    def torch_adamw(ps):
        return torch.optim.AdamW(ps, lr=LR, fused=b.cuda)

    def torchao_adamwfp8(ps):
        from torchao.optim import AdamWFp8

        return AdamWFp8(ps, lr=LR)

    bf16 = torch.bfloat16

    def runs():
        b.run("env", "env", b.env, optional=False)
        # most important first; optional runs are skipped once the budget is spent
        for key, k, n, count in ((f"{h}->{h}", h, h, 1), (f"{h}->{f}", h, f, 1), (f"{f}->{h}", f, h, 1),
                                 (f"qkv 3x{h}->{h}", h, h, 3)):
            b.run("linear", key, lambda k=k, n=n, c=count, key=key: b.linear(key, k, n, c), optional=False)
        b.run("layer", "bf16", lambda: b.layer("bf16"), optional=False)
        b.run("layer", "fp8coat_fp8-linear", lambda: b.layer("fp8coat_fp8-linear", "fp8-linear"), optional=False)
        b.run("layer", "fp8coat_coat", lambda: b.layer("fp8coat_coat", "coat"), optional=False)
        b.run("model4", "bf16amp_eager", lambda: b.train("bf16amp_eager", torch_adamw, amp=True), optional=False)
        b.run("model4", "fp8coat_coat_eager",
              lambda: b.train("fp8coat_coat_eager", fp8coat_adamw(), recipe="coat", param_dtype=bf16),
              optional=False)
        b.run("model4", "fp8coat_coat_eager_stochastic_chunkedloss",
              lambda: b.train("fp8coat_coat_eager_stochastic_chunkedloss", fp8coat_adamw("bf16-stochastic"),
                              recipe="coat", param_dtype=bf16, chunked_loss=True))
        b.run("model4", "fp8coat_coat_eager_chunkedloss",
              lambda: b.train("fp8coat_coat_eager_chunkedloss", fp8coat_adamw(), recipe="coat", param_dtype=bf16,
                              chunked_loss=True))
        b.run("model4", "fp8coat_coat_eager_inbackward_chunkedloss",
              lambda: b.train("fp8coat_coat_eager_inbackward_chunkedloss", fp8coat_adamw(), recipe="coat",
                              param_dtype=bf16, chunked_loss=True, in_backward=True))
        b.run("model4", "fp8coat_coat_compiled_stochastic_inbackward",
              lambda: b.train("fp8coat_coat_compiled_stochastic_inbackward", fp8coat_adamw("bf16-stochastic"),
                              recipe="coat", param_dtype=bf16, compiled=True, in_backward=True), compiled=True)
        b.run("model4", "fp8coat_coat_compiled_stochastic_inbackward_chunkedloss",
              lambda: b.train("fp8coat_coat_compiled_stochastic_inbackward_chunkedloss",
                              fp8coat_adamw("bf16-stochastic"), recipe="coat", param_dtype=bf16, chunked_loss=True,
                              compiled=True, in_backward=True), compiled=True)
        b.run("model4", "fp8coat_coat_compiled_stochastic_inbackward_serial",
              lambda: b.train("fp8coat_coat_compiled_stochastic_inbackward_serial", fp8coat_adamw("bf16-stochastic"),
                              recipe="coat", param_dtype=bf16, compiled=True, in_backward="serial"), compiled=True)
        b.run("model4", "fp8coat_coat_compiled_stochastic_chunkedloss",
              lambda: b.train("fp8coat_coat_compiled_stochastic_chunkedloss", fp8coat_adamw("bf16-stochastic"),
                              recipe="coat", param_dtype=bf16, chunked_loss=True, compiled=True), compiled=True)
        b.run("model4", "fp8coat_coat_compiled_stochastic_chunkedloss8192",
              lambda: b.train("fp8coat_coat_compiled_stochastic_chunkedloss8192", fp8coat_adamw("bf16-stochastic"),
                              recipe="coat", param_dtype=bf16, chunked_loss=True, compiled=True, loss_chunk=8192),
              compiled=True)
        b.run("model4", "fp8coat_fp8-linear_eager",
              lambda: b.train("fp8coat_fp8-linear_eager", fp8coat_adamw(), recipe="fp8-linear", param_dtype=bf16))
        b.run("model4", "torchao_fp8_compiled_adamwfp8",
              lambda: b.train("torchao_fp8_compiled_adamwfp8", torchao_adamwfp8, torchao=True, compiled=True,
                              amp=True), compiled=True)
        b.run("model4", "fp8coat_coat_compiled",
              lambda: b.train("fp8coat_coat_compiled", fp8coat_adamw(), recipe="coat", param_dtype=bf16,
                              compiled=True), compiled=True)
        b.run("layer", "fp8coat_coat_compiled", lambda: b.layer("fp8coat_coat_compiled", "coat", compiled=True),
              compiled=True)
        b.run("model4", "fp8coat_coat_eager_stochastic",
              lambda: b.train("fp8coat_coat_eager_stochastic", fp8coat_adamw("bf16-stochastic"), recipe="coat",
                              param_dtype=bf16))
        b.run("layer", "bf16_compiled", lambda: b.layer("bf16_compiled", compiled=True), compiled=True)
        b.run("layer", "torchao_fp8_compiled", lambda: b.layer("torchao_fp8_compiled", torchao=True, compiled=True),
              compiled=True)
        b.run("model4", "bf16amp_compiled", lambda: b.train("bf16amp_compiled", torch_adamw, amp=True, compiled=True),
              compiled=True)

    b.main_loop(runs)
    b.finish("bench_layers", table(b.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
