"""Where the host time of the FP8 linear goes (GPU only).

1. Host µs per call of the pieces, on tiny inputs so the GPU never limits (median of batches of calls):
   the per-tensor scale (public function), one amax launch through Triton's JIT and through fp8coat's
   ``FastKernel``, the allocations a call makes, ``quantize_transpose``, ``torch._scaled_mm``, one aten op.
2. Host µs per fwd+bwd call of a whole linear (BF16 ``F.linear``; FP8 with the weight re-quantized / cached), on a
   tiny shape (host-bound: the figure is the host cost) and at 8192 × 4096 → 4096: the time to enqueue 10 calls
   without waiting, against the wall time of the 10 calls (enqueue ≈ wall: host-bound; enqueue << wall:
   GPU-bound; enqueue > GPU time with the host blocked inside a call: something waits for the GPU).
3. cProfile of 10 FP8 fwd+bwd calls at the real shape, by own time: a C function with a large own time per call
   is where the host waits.

    python3 scripts/host_overhead_gpu.py
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8coat.formats import E4M3  # noqa: E402
from fp8coat.ops.linear import FP8WeightCache, linear  # noqa: E402
from fp8coat.quantization import triton_kernels as tk  # noqa: E402


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
    meta = dict(FMAX=E4M3.max, SCALE=True, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK=tk.AMAX_PROGRAMS)
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


def profile_real_shape() -> None:
    for name in ("fp8", "fp8_cached"):
        fn = _linear_variants(8192, 4096, 4096)[name]
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        print(f"\ncProfile, 10 calls of {name} at 8192x4096 -> 4096, by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> int:
    if not torch.cuda.is_available():
        print("host_overhead_gpu: needs a CUDA device")
        return 0
    pieces()
    whole_linear()
    profile_real_shape()
    return 0


if __name__ == "__main__":
    sys.exit(main())
