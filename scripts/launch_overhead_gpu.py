"""Host cost of launching one small Triton kernel, broken down (GPU only).

Times, per call (µs, median of several batches of calls on a tiny input so the GPU never limits):
``tensor_scale_triton`` (the public function: allocations + memset + launch), Triton's JIT launch alone with
preallocated buffers, the allocations alone, and one aten op (``torch.amax``) for scale. (Calling the compiled
kernel's runner directly, ``CompiledKernel[grid](*args)``, failed on triton 3.6: its argument layout differs.)

    python3 scripts/launch_overhead_gpu.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8coat.formats import E4M3  # noqa: E402
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


def main() -> int:
    if not torch.cuda.is_available():
        print("launch_overhead_gpu: needs a CUDA device")
        return 0
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    r, k = x.shape
    block_r, block_k = tk._tiles(r, k)
    grid = (-(-r // block_r), -(-k // block_k))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    scale = torch.empty((), dtype=torch.float32, device="cuda")
    args = (x, part, count, scale, r, k, x.stride(0), x.stride(1))
    meta = dict(FMAX=E4M3.max, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK=1024)

    def jit_launch():
        tk._amax_scale_kernel[grid](*args, **meta)

    def allocations():
        torch.empty((), dtype=torch.float32, device="cuda")
        torch.empty(grid[0] * grid[1], dtype=torch.float32, device="cuda")
        torch.zeros(1, dtype=torch.int32, device="cuda")

    rows = {
        "tensor_scale_triton (public function)": lambda: tk.tensor_scale_triton(x, E4M3),
        "JIT launch, buffers preallocated": jit_launch,
        "allocations alone (2 empty + 1 zeros)": allocations,
        "torch.amax (one aten op)": lambda: torch.amax(x),
    }
    print(f"host µs per call (torch {torch.__version__}):")
    for name, fn in rows.items():
        try:
            print(f"  {per_call_us(fn):8.1f}  {name}")
        except Exception as ex:  # noqa: BLE001 - report and go on
            print(f"  failed    {name}: {ex!r}"[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
