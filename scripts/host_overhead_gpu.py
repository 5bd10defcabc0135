"""Where the host time of the FP8 linear goes (GPU only).

1. Host µs per call of the pieces, on tiny inputs so the GPU never limits (median of batches of calls):
   the per-tensor scale (public function), one amax launch through Triton's JIT and through fp8coat's
   ``FastKernel``, the allocations a call makes, ``quantize_transpose``, ``torch._scaled_mm``, one aten op.
2. Host µs per fwd+bwd call of a whole linear (BF16 ``F.linear``; FP8 with the weight re-quantized / cached), on a
   tiny shape (host-bound: the figure is the host cost) and at 8192 × 4096 → 4096: the time to enqueue 10 calls
   without waiting, against the wall time of the 10 calls (enqueue ≈ wall: host-bound; enqueue << wall:
   GPU-bound; enqueue > GPU time with the host blocked inside a call: something waits for the GPU).
3. Host µs per call of each function the FP8 linear calls (timed by wrapping them), forward and backward apart,
   on a tiny shape: the rest of a call's time is the op's own Python and autograd.
4. The amax kernel's GPU time at 8192 × 4096 bf16 for several tile sizes, warp counts and program counts (CUDA
   events, median of 20), against a copy of the same tensor.

    python -m scripts.host_overhead_gpu        # from the repository root
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import launch_graph_us
from fp8coat.formats import E4M3
from fp8coat.ops.linear import FP8WeightCache, linear
from fp8coat.quantization import triton_kernels as tk


def per_call_us(fn, calls: int = 200, batches: int = 7) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    return statistics.median(out)


def pieces() -> None:
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    r, k = x.shape
    block_r, block_k = tk._tiles(r, k)
    tiles_k = -(-k // block_k)
    tiles = -(-r // block_r) * tiles_k
    part, count = tk._amax_scratch(x.device)
    out = torch.empty((), dtype=torch.float32, device="cuda")
    args = (x, part, count, out, r, k, x.stride(0), x.stride(1), tiles_k, tiles)
    meta = {"FMAX": E4M3.max, "SCALE": True, "PRIOR": False, "BLOCK_R": block_r, "BLOCK_K": block_k,
            "BLOCK": tk.AMAX_PROGRAMS}
    grid = (min(tiles, tk.AMAX_PROGRAMS),)
    a8 = torch.randn(64, 64, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    rows = {
        "tensor_scale_triton (public function)": lambda: tk.tensor_scale_triton(x, E4M3),
        "amax launch through Triton's JIT": lambda: tk._amax_kernel.fn[grid](*args, **meta),
        "amax launch through FastKernel": lambda: tk._amax_kernel[grid](*args, **meta),
        "quantize_transpose_triton (q and qᵀ)": lambda: tk.quantize_transpose_triton(x, E4M3, one),
        "torch.empty x2 (the outputs of one quantization)": lambda: (torch.empty_like(a8), torch.empty_like(a8)),
        "torch._scaled_mm 64x64x64": lambda: torch._scaled_mm(a8, a8.t(), scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16, use_fast_accum=True),
        "torch.amax (one aten op)": lambda: torch.amax(x),
    }
    print(f"host µs per call (torch {torch.__version__}, triton {__import__('triton').__version__}):")
    for name, fn in rows.items():
        try:
            print(f"  {per_call_us(fn):8.1f}  {name}")
        except Exception as ex:  # noqa: BLE001 - report and go on
            print(f"  failed    {name}: {ex!r}"[:300])


def _linear_variants(m: int, k: int, n: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    cache = FP8WeightCache()

    def fp8(clear: bool):
        if clear:
            cache.clear()
        return torch.autograd.grad(linear(x, w, cache=cache), [x, w], gy)

    return {"bf16": lambda: torch.autograd.grad(F.linear(x, w), [x, w], gy),
            "fp8": lambda: fp8(True), "fp8_cached": lambda: fp8(False)}


def whole_linear() -> None:
    for m, k, n in ((256, 256, 256), (8192, 4096, 4096)):
        print(f"\nlinear fwd+bwd {m}x{k} -> {n}: µs per call, 10 calls queued (3 repeats, median)")
        print(f"{'variant':>12} {'enqueue':>9} {'wall':>9}")
        for name, fn in _linear_variants(m, k, n).items():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            enq, wall = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                enq.append((t1 - t0) * 1e5)
                wall.append((t2 - t0) * 1e5)
            print(f"{name:>12} {statistics.median(enq):9.1f} {statistics.median(wall):9.1f}")


def breakdown(m: int = 256, k: int = 256, n: int = 256, calls: int = 200, warmup: int = 20) -> None:
    """Host µs per fwd+bwd of the functions the FP8 linear calls, timed from inside the op by wrapping them."""
    import fp8coat.ops.linear as lin

    totals: dict[str, float] = {}
    names = ("tensor_scale", "quantize_transpose", "weight_fp8", "fp8_mm")
    originals = {name: getattr(lin, name) for name in names}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    for name in names:
        setattr(lin, name, timed(name, originals[name]))
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
        for variant in ("fp8", "fp8_cached"):
            cache = FP8WeightCache()
            fwd_s = bwd_s = 0.0
            for i in range(warmup + calls):
                if i == warmup:
                    torch.cuda.synchronize()
                    totals.clear()
                    fwd_s = bwd_s = 0.0
                if variant == "fp8":
                    cache.clear()
                t0 = time.perf_counter()
                y = linear(x, w, cache=cache)
                t1 = time.perf_counter()
                torch.autograd.grad(y, [x, w], gy)
                t2 = time.perf_counter()
                fwd_s += t1 - t0
                bwd_s += t2 - t1
            torch.cuda.synchronize()
            us = lambda v: v * 1e6 / calls
            print(f"\n{variant} {m}x{k}->{n}: forward {us(fwd_s):.1f} µs, backward (autograd.grad) {us(bwd_s):.1f} µs "
                  "per call")
            for name in names:
                print(f"  {us(totals.get(name, 0.0)):8.1f}  {name}")
            print(f"  {us(fwd_s + bwd_s - sum(totals.values())):8.1f}  rest (the op's Python, autograd, weight cache)")
    finally:
        for name, fn in originals.items():
            setattr(lin, name, fn)


def bisect(calls: int = 200) -> None:
    """The same pieces timed alone, on fresh tensors, in the op's order, and from a second thread (as the
    autograd engine runs backward on a worker thread for CUDA tensors)."""
    import threading

    from fp8coat.ops.linear import fp8_mm
    from fp8coat.quantization import quantize_transpose, tensor_scale

    xs = [torch.randn(256, 256, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
    w8 = torch.randn(256, 256, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")

    def loop(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in xs:
            fn(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) * 1e6 / calls

    def sequence(x):
        s = tensor_scale(x, "e4m3")
        q, _qt = quantize_transpose(x, "e4m3", s)
        fp8_mm(q, s, w8, one, torch.bfloat16, fast_accum=True)

    rows = {
        "tensor_scale, same tensor": lambda x: tensor_scale(xs[0], "e4m3"),
        "tensor_scale, a fresh tensor each call": lambda x: tensor_scale(x, "e4m3"),
        "quantize_transpose, fresh tensors": lambda x: quantize_transpose(x, "e4m3", one),
        "fp8_mm 256^3": lambda x: fp8_mm(w8, one, w8, one, torch.bfloat16, fast_accum=True),
        "scale + quantize_transpose + fp8_mm in sequence": sequence,
    }
    print(f"\nhost µs per call, {calls} calls:")
    for name, fn in rows.items():
        loop(fn)
        print(f"  {loop(fn):8.1f}  {name}")
    out = []
    th = threading.Thread(target=lambda: out.append(loop(sequence)))
    th.start()
    th.join()
    out.clear()
    th = threading.Thread(target=lambda: out.append(loop(sequence)))
    th.start()
    th.join()
    print(f"  {out[0]:8.1f}  the same sequence on a second thread")

    def python_only(_x):
        total = 0
        for i in range(300):
            total += i * i
        return total

    main_us = loop(python_only)
    out.clear()
    th = threading.Thread(target=lambda: out.append(loop(python_only)))
    th.start()
    th.join()
    print(f"  {main_us:8.1f} / {out[0]:.1f}  a pure-Python loop (no CUDA) on the main thread / on a second thread")

    import cProfile
    import pstats

    fn = _linear_variants(256, 256, 256)["fp8_cached"]
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = sorted(((v[2], v[3], v[0], k) for k, v in stats.items()), reverse=True)[:25]
    print(f"\ncProfile of {calls} fp8_cached fwd+bwd 256^3 calls: own / cumulative µs per fwd+bwd call, calls per call")
    for own, cum, n, (file, line, func) in rows:
        print(f"  {own * 1e6 / calls:8.1f} {cum * 1e6 / calls:8.1f} {n / calls:6.1f}  {Path(file).name}:{line} {func}")


def amax_sweep() -> None:
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    r, k = x.shape
    part = torch.empty(8192, dtype=torch.float32, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")

    def gpu_ms(fn) -> float:
        return launch_graph_us(fn) / 1e3

    y = torch.empty_like(x)
    print(f"\namax of 8192x4096 bf16 (64 MiB), GPU µs: copy of the tensor {gpu_ms(lambda: y.copy_(x)) * 1e3:.1f} "
          "(reads and writes), current launcher (incl. its scratch) "
          f"{gpu_ms(lambda: tk.tensor_scale_triton(x, E4M3)) * 1e3:.1f}")
    print(f"{'tile':>10} {'warps':>6} {'programs':>9} {'µs':>7}")
    for block_r, block_k in ((4, 1024), (8, 1024), (16, 1024)):
        tiles_k = -(-k // block_k)
        tiles = -(-r // block_r) * tiles_k
        for warps in (4, 8):
            for programs in (528, 1056, 2112):
                if programs > part.numel() or programs > tiles:
                    continue
                meta = {"FMAX": E4M3.max, "SCALE": True, "PRIOR": False, "BLOCK_R": block_r, "BLOCK_K": block_k,
                        "BLOCK": next_pow2(programs), "num_warps": warps}
                args = (x, part, count, out, r, k, x.stride(0), x.stride(1), tiles_k, tiles)
                us = gpu_ms(lambda p=programs, a=args, kw=meta: tk._amax_kernel.fn[(p,)](*a, **kw)) * 1e3
                print(f"{block_r:>4}x{block_k:<5} {warps:>6} {programs:>9} {us:7.1f}")


def next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def main() -> int:
    if not torch.cuda.is_available():
        print("host_overhead_gpu: needs a CUDA device")
        return 0
    pieces()
    whole_linear()
    breakdown()
    bisect()
    amax_sweep()
    return 0


if __name__ == "__main__":
    sys.exit(main())
