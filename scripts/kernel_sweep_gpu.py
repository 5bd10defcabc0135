"""Launch-configuration sweep of fp8coat's memory-bound kernels at the full Llama-2-7B's shapes (batch × sequence
= ``--tokens`` rows; hidden 4096, intermediate 11008): device time per launch and bandwidth of each
configuration next to the launcher's current one, outputs checked bit for bit against the launcher's.

    python -m scripts.kernel_sweep_gpu [--tokens 32768] [--only norm_fwd,norm_bwd,...] [--json PATH]   # CUDA

Kernels: the RMSNorm forward and backward (``ops.norms_kernels``), the SwiGLU forward and backward
(``ops.activation_kernels``), the recompute-quantize-transpose of an RMSNorm or SwiGLU output
(``ops.recompute_kernels``) and the per-tensor amax (``quantization.triton_kernels``); and torch's causal SDPA
per backend (forward and forward + backward at 32 heads × 2048 × 128, CUDA events, median of 7), the attention
the converted models call. Each kernel configuration launches the kernel directly (``kernel.fn[grid](...)``) and
is timed as 20 launches in a CUDA graph (median of 7 replays).
Bytes moved: what the kernel must read and write once (the bandwidth a perfect kernel would need).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.harness import launch_graph_us, time_ms
from fp8coat._grid import cdiv, padded, tile_2d
from fp8coat.formats import E4M3
from fp8coat.ops import activation_kernels as ak
from fp8coat.ops import norms_kernels as nk
from fp8coat.ops import recompute_kernels as rk
from fp8coat.quantization import triton_kernels as tk

# ruff: noqa: B023 - every closure below is timed within the loop iteration that defines it

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 and tiny --tokens, untimed
G = 16
LIBDEV = DEVICE == "cuda"  # CUDA's precise exp/erf, as the launchers pick on the GPU
HIDDEN, INTER = 4096, 11008
RESULTS: list[dict] = []


def gpu_us(fn) -> float:
    if DEVICE == "cpu":  # a check of the launches under the Triton interpreter: run once, no timing
        fn()
        return 1.0
    return launch_graph_us(fn)


def _synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _same(a: "list[torch.Tensor]", b: "list[torch.Tensor]") -> bool:
    return all(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)) for x, y in zip(a, b))


def _report(kernel: str, shape: str, moved: int, launcher_us: float, rows: "list[tuple[str, float | None, bool]]"):
    print(f"\n{kernel} {shape}: launcher {launcher_us:.1f} µs ({moved / launcher_us / 1e6:.2f} TB/s)")
    best = min((r for r in rows if r[1] is not None and r[2]), key=lambda r: r[1], default=None)
    for label, us, same in rows:
        if us is None:
            print(f"  {label:<34} failed")
            continue
        mark = "  <- best" if best is not None and label == best[0] else ""
        print(f"  {label:<34} {us:8.1f} µs {moved / us / 1e6:6.2f} TB/s  same bits: {same}{mark}")
    RESULTS.append(dict(kernel=kernel, shape=shape, bytes=moved, launcher_us=launcher_us,
                        configs=[dict(config=label, us=us, same=same) for label, us, same in rows],
                        best=best[0] if best else None, best_us=best[1] if best else None))


def _try(launch, outputs, want) -> "tuple[float | None, bool]":
    try:
        launch()
        _synchronize()
    except Exception as ex:  # noqa: BLE001 - e.g. too many registers / shared memory for a large tile
        print(f"    ({type(ex).__name__}: {str(ex)[:100]})")
        return None, False
    return gpu_us(launch), _same(outputs, want)


def sweep_norm_fwd(m: int) -> None:
    x = torch.randn(m, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    want = list(nk.norm_fwd_triton(x, w, None, 1e-5, G, False))
    want = [want[0], want[1], want[2], want[4], want[5]]
    launcher_us = gpu_us(lambda: nk.norm_fwd_triton(x, w, None, 1e-5, G, False))
    ng = cdiv(HIDDEN, G)
    y, q = torch.empty_like(x), torch.empty(x.shape, dtype=E4M3.dtype, device=DEVICE)
    s, rstd = torch.empty(m, ng, device=DEVICE), torch.empty(m, device=DEVICE)
    amax = torch.zeros((), dtype=torch.int32, device=DEVICE)
    moved = x.numel() * (2 + 2 + 1) + s.numel() * 4 + m * 4
    rows = []
    for block_r, warps in ((1, 16), (1, 8), (1, 4), (2, 8), (2, 16), (4, 16)):
        def launch():
            amax.zero_()  # as the launcher's fresh slot: every program's tile max is then folded in
            nk._norm_fwd_kernel.fn[(cdiv(m, block_r),)](
                x, w, x, y, q, s, rstd, rstd, amax, m, HIDDEN, ng, x.stride(0), x.stride(1), 1e-5,
                LAYERNORM=False, HAS_W=True, HAS_B=False, FMAX=E4M3.max, G=G, BLOCK_R=block_r, BLOCK_H=4096,
                num_warps=warps, enable_fp_fusion=False)
        us, same = _try(launch, [y, q, s, rstd, amax.view(torch.float32)], want)
        rows.append((f"BLOCK_R={block_r} warps={warps}", us, same))
    _report("norm_fwd", f"{m}x{HIDDEN}", moved, launcher_us, rows)


def sweep_norm_bwd(m: int) -> None:
    x = torch.randn(m, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    _, xq, xs, _, rstd, _ = nk.norm_fwd_triton(x, w, None, 1e-5, G, False)
    want = list(nk.norm_bwd_triton(dy, xq, xs, None, rstd, w, G, False, False))[:2]
    launcher_us = gpu_us(lambda: nk.norm_bwd_triton(dy, xq, xs, None, rstd, w, G, False, False))
    ng = cdiv(HIDDEN, G)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 2
    moved = x.numel() * (2 + 1 + 2) + xs.numel() * 4 + m * 4
    rows = []
    for block_r, warps, per_sm in ((1, 16, 2), (1, 8, 2), (1, 8, 4), (1, 4, 8), (1, 16, 4), (2, 16, 2), (2, 8, 4),
                                   (1, 8, 8), (4, 16, 2)):
        nblocks = cdiv(m, block_r)
        nprog = min(nblocks, per_sm * sms)
        dx = torch.empty_like(dy)
        part = torch.empty((nprog, HIDDEN), dtype=torch.float64, device=DEVICE)

        def launch():
            nk._norm_bwd_kernel.fn[(nprog,)](
                dy, xq, xs, rstd, rstd, w, dx, part, dx, m, HIDDEN, ng, dy.stride(0), dy.stride(1), nblocks,
                LAYERNORM=False, HAS_W=True, HAS_DB=False, G=G, BLOCK_R=block_r, BLOCK_H=4096,
                num_warps=warps, enable_fp_fusion=False)
            return part.sum(0).to(w.dtype)

        try:
            dw = launch()
            _synchronize()
        except Exception as ex:  # noqa: BLE001
            print(f"    ({type(ex).__name__}: {str(ex)[:100]})")
            rows.append((f"BLOCK_R={block_r} warps={warps} programs={per_sm}/SM", None, False))
            continue
        # dw sums per-program fp64 partials: another split of the rows rounds the same to bf16 almost always
        same = torch.equal(dx.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(dw, want[1])
        rows.append((f"BLOCK_R={block_r} warps={warps} programs={per_sm}/SM", gpu_us(launch), same))
    _report("norm_bwd", f"{m}x{HIDDEN}", moved, launcher_us, rows)


def sweep_act(m: int) -> None:
    gate = torch.randn(m, INTER, device=DEVICE, dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    dy = torch.randn_like(gate)
    want_f = list(ak.forward_triton(gate, up, 0, G))
    want_b = list(ak.backward_triton(dy, *want_f[1:5], 0, G, want_amax=True))  # (dx, du, amax)
    ng = cdiv(INTER, G)
    fwd_us = gpu_us(lambda: ak.forward_triton(gate, up, 0, G))
    bwd_us = gpu_us(lambda: ak.backward_triton(dy, *want_f[1:5], 0, G, want_amax=True))
    _, xq, xs, uq, us_, _ = want_f
    amax = torch.zeros((), dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(gate)
    qs = [torch.empty_like(xq), torch.empty_like(xs), torch.empty_like(uq), torch.empty_like(us_)]
    dx, du = torch.empty_like(gate), torch.empty_like(gate)
    moved_f = gate.numel() * (2 + 2 + 2 + 1 + 1) + 2 * xs.numel() * 4
    moved_b = gate.numel() * (2 + 1 + 1 + 2 + 2) + 2 * xs.numel() * 4
    rows_f, rows_b = [], []
    for max_k, elems, warps in ((1024, 2048, 4), (1024, 4096, 4), (1024, 4096, 8), (512, 2048, 4), (2048, 4096, 8),
                                (1024, 8192, 8), (256, 1024, 2), (512, 1024, 2)):
        block_r, block_k = tile_2d(m, INTER, min_k=G, max_k=max_k, elems=elems)
        k_tiles = cdiv(INTER, block_k)
        grid = (cdiv(m, block_r) * k_tiles,)
        label = f"{block_r}x{block_k} warps={warps}"

        def launch_f():
            amax.zero_()
            ak._act_fwd_kernel.fn[grid](
                gate, up, out, *qs, amax, m, INTER, ng, k_tiles, gate.stride(0), gate.stride(1), up.stride(0),
                up.stride(1), ACT=0, GATED=True, FMAX=E4M3.max, G=G, BLOCK_R=block_r, BLOCK_K=block_k,
                LIBDEVICE=LIBDEV, num_warps=warps, enable_fp_fusion=False)

        def launch_b():
            amax.zero_()
            ak._act_bwd_kernel.fn[grid](
                dy, xq, xs, uq, us_, dx, du, amax, m, INTER, ng, k_tiles, dy.stride(0), dy.stride(1),
                ACT=0, GATED=True, AMAX=True, G=G, BLOCK_R=block_r, BLOCK_K=block_k, LIBDEVICE=LIBDEV, num_warps=warps,
                enable_fp_fusion=False)

        rows_f.append((label, *_try(launch_f, [out, *qs, amax.view(torch.float32)], want_f)))
        rows_b.append((label, *_try(launch_b, [dx, du, amax.view(torch.float32)], want_b)))
    _report("act_fwd", f"{m}x{INTER} swiglu", moved_f, fwd_us, rows_f)
    _report("act_bwd", f"{m}x{INTER} swiglu", moved_b, bwd_us, rows_b)


def sweep_recompute(m: int) -> None:
    from fp8coat.ops import norms_kernels

    x = torch.randn(m, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    _, xq, xs, _, rstd, _ = norms_kernels.norm_fwd_triton(x, w, None, 1e-5, G, False)
    gate = torch.randn(m, INTER, device=DEVICE, dtype=torch.bfloat16)
    _, gq, gs, uq, us_, _ = ak.forward_triton(gate, torch.randn_like(gate), 0, G)
    scale = torch.tensor(0.01, device=DEVICE)
    m_pad = padded(m)
    for kind, src, k in (("rmsnorm", [xq, xs, rstd, w], HIDDEN), ("swiglu", [gq, gs, uq, us_], INTER)):
        want = rk.recompute_quantized_t_triton(kind, src, G, torch.bfloat16, scale, E4M3)
        launcher_us = gpu_us(lambda: rk.recompute_quantized_t_triton(kind, src, G, torch.bfloat16, scale, E4M3))
        ng = cdiv(k, G)
        n_in = 1 if kind == "rmsnorm" else 2
        moved = m * k * (n_in + 1) + n_in * m * ng * 4
        out = torch.empty((k, m_pad), dtype=E4M3.dtype, device=DEVICE)
        a_q, a_s = src[0], src[1]
        b_q, b_s = (src[2], src[3]) if kind == "swiglu" else (a_q, a_s)
        rs, ww = (rstd, w) if kind == "rmsnorm" else (a_s, a_s)
        code = 1 if kind == "rmsnorm" else 2
        rows = []
        for block_m, block_k, warps in ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8), (64, 128, 8),
                                        (128, 128, 8), (32, 128, 4), (64, 256, 8), (128, 32, 4), (64, 64, 8)):
            grid = (cdiv(m_pad, block_m), cdiv(k, block_k))

            def launch():
                rk._recompute_kernel.fn[grid](
                    a_q, a_s, b_q, b_s, rs, ww, scale, out, m, k, ng, m_pad,
                    KIND=code, ROUND=1, STORE_T=True, FMAX=E4M3.max, G=G, BLOCK_M=block_m, BLOCK_K=block_k,
                    LIBDEVICE=LIBDEV, num_warps=warps, enable_fp_fusion=False)

            rows.append((f"{block_m}x{block_k} warps={warps}", *_try(launch, [out], [want])))
        _report(f"recompute_{kind}", f"{m}x{k}", moved, launcher_us, rows)


def sweep_amax(m: int) -> None:
    for k in (HIDDEN, INTER):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        part, count = tk._amax_scratch(x.device)
        out = torch.empty((), dtype=torch.float32, device=DEVICE)
        want = tk.tensor_scale_triton(x, E4M3)
        launcher_us = gpu_us(lambda: tk.tensor_scale_triton(x, E4M3))
        rows = []
        for block_r, block_k, warps, programs in ((4, 1024, 4, 1024), (8, 1024, 4, 1024), (8, 1024, 8, 1024),
                                                  (16, 1024, 8, 1024), (8, 1024, 8, 528), (16, 1024, 16, 528),
                                                  (8, 2048, 8, 1024), (32, 512, 8, 1024), (4, 1024, 4, 528)):
            tiles_k = cdiv(k, block_k)
            tiles = cdiv(m, block_r) * tiles_k

            def launch():
                tk._amax_kernel.fn[(min(programs, tiles),)](
                    x, part, count, out, m, k, x.stride(0), x.stride(1), tiles_k, tiles, FMAX=E4M3.max,
                    SCALE=True, PRIOR=False, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK=tk.AMAX_PROGRAMS,
                    num_warps=warps)

            rows.append((f"{block_r}x{block_k} warps={warps} programs={programs}", *_try(launch, [out], [want])))
        _report("amax", f"{m}x{k}", x.numel() * 2, launcher_us, rows)


def sweep_sdpa(m: int, seq: int = 2048, heads: int = 32, head_dim: int = 128) -> None:
    """Causal SDPA forward + backward at the 7B's attention shape per backend (``torch.nn.attention``): the
    backend torch picks by default next to each one forced. Gradients compared with the default's (max |diff|)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = max(m // seq, 1)
    seq = min(seq, m)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def timed(fn) -> float:  # each call is milliseconds: CUDA events around single calls suffice
        return time_ms(fn, DEVICE, warmup=2, iters=7)["ms"] * 1e3

    want = step()
    rows = [dict(config="default", fwd_us=timed(fwd), fwd_bwd_us=timed(step), max_diff=0.0)]
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    for backend in backends if DEVICE == "cuda" else []:
        try:
            with sdpa_kernel([backend]):
                got = step()
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
                rows.append(dict(config=backend.name, fwd_us=timed(fwd), fwd_bwd_us=timed(step), max_diff=diff))
        except Exception as ex:  # noqa: BLE001 - a backend that does not support the shape / GPU
            rows.append(dict(config=backend.name, fwd_us=None, fwd_bwd_us=None, max_diff=None,
                             error=f"{type(ex).__name__}: {str(ex)[:120]}"))
    print(f"\nsdpa causal {shape} bf16 (forward / forward + backward):")
    for r in rows:
        if r["fwd_us"] is None:
            print(f"  {r['config']:<22} failed: {r['error']}")
        else:
            print(f"  {r['config']:<22} {r['fwd_us']:9.1f} / {r['fwd_bwd_us']:9.1f} µs  max |diff| {r['max_diff']:.3g}")
    RESULTS.append(dict(kernel="sdpa", shape=str(shape), configs=rows))


SWEEPS = {"norm_fwd": sweep_norm_fwd, "norm_bwd": sweep_norm_bwd, "act": sweep_act, "recompute": sweep_recompute,
          "amax": sweep_amax, "sdpa": sweep_sdpa}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="rows: batch × sequence (7B at batch 16 × 2048)")
    ap.add_argument("--only", default=",".join(SWEEPS), help=f"comma-separated subset of {sorted(SWEEPS)}")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel_sweep_gpu: needs a CUDA device (or TRITON_INTERPRET=1 and a tiny --tokens, untimed)")
        return
    torch.manual_seed(0)
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "| rows", args.tokens)
    src = torch.empty(args.tokens, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    copy_us = gpu_us(lambda: torch.empty_like(src).copy_(src))
    print(f"copy of {args.tokens}x{HIDDEN} bf16: {copy_us:.1f} µs ({2 * src.numel() * 2 / copy_us / 1e6:.2f} TB/s)")
    for name in args.only.split(","):
        SWEEPS[name](args.tokens)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
            json.dump(dict(device=device, tokens=args.tokens, results=RESULTS), f, indent=1)


if __name__ == "__main__":
    main()
