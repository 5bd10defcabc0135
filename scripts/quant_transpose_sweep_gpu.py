"""Tile sweep of the FP8 quantize-transpose kernel (and of the amax kernel) at a real shape: device time per launch
and bandwidth.

    python -m scripts.quant_transpose_sweep_gpu [--m 8192 --k 4096]      # needs a CUDA GPU

For each (BLOCK_M, BLOCK_K, warps) it launches ``_quant_transpose_kernel`` directly (row-major + transposed copy, and
transposed only), checks the output bit for bit against the launcher's current configuration, and times 20 launches
captured in a CUDA graph (median of 7 replays). Bytes moved: the bf16 read plus the FP8 writes. The per-tensor amax
kernel's sweep is ``scripts.kernel_sweep_gpu --only amax``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import launch_graph_us as gpu_us
from fp8coat.formats import E4M3
from fp8coat.quantization import triton_kernels as tk

# ruff: noqa: B023 - every closure below is timed within the loop iteration that defines it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("quant_transpose_sweep_gpu: needs a CUDA device")
        return
    m, k = args.m, args.k
    m_pad = -(-m // 16) * 16
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    scale = tk.tensor_scale_triton(x, E4M3)
    copy_us = gpu_us(lambda: torch.empty_like(x).copy_(x))
    print(f"quantize-transpose of {m}x{k} bf16; a copy of the tensor: {copy_us:.1f} µs "
          f"({2 * x.numel() * 2 / copy_us / 1e6:.2f} TB/s)")
    for rowwise in (True, False):
        ref_q, ref_qt = tk.quantize_transpose_triton(x, E4M3, scale, rowwise=rowwise)
        launcher_us = gpu_us(lambda: tk.quantize_transpose_triton(x, E4M3, scale, rowwise=rowwise))
        moved = x.numel() * 2 + x.numel() * (2 if rowwise else 1)
        print(f"\n{'row-major + transposed' if rowwise else 'transposed only'}: launcher {launcher_us:.1f} µs "
              f"({moved / launcher_us / 1e6:.2f} TB/s)")
        print(f"{'BLOCK_M':>8} {'BLOCK_K':>8} {'warps':>6} {'µs':>7} {'TB/s':>6}  same bits")
        for block_m, block_k, warps in ((64, 64, 4), (64, 64, 8), (128, 64, 4), (128, 64, 8), (64, 128, 4),
                                        (64, 128, 8), (128, 128, 8), (128, 128, 16), (32, 128, 4), (256, 64, 8),
                                        (32, 64, 4), (128, 32, 4)):
            q = torch.empty((m, k), dtype=E4M3.dtype, device="cuda")
            qt = torch.empty((k, m_pad), dtype=E4M3.dtype, device="cuda")
            grid = (-(-m_pad // block_m), -(-k // block_k))

            def launch():
                tk._quant_transpose_kernel.fn[grid](
                    x, scale, q if rowwise else qt, qt, m, k, m_pad, x.stride(0), x.stride(1), k, m_pad,
                    FMAX=E4M3.max, ROWWISE=rowwise, TRANSPOSED=True, BLOCK_M=block_m, BLOCK_K=block_k,
                    num_warps=warps)

            try:
                launch()
                torch.cuda.synchronize()
            except Exception as ex:  # noqa: BLE001 - e.g. out of shared memory for the largest tiles
                print(f"{block_m:>8} {block_k:>8} {warps:>6}  failed: {type(ex).__name__}: {str(ex)[:80]}")
                continue
            same = torch.equal(qt.view(torch.uint8), ref_qt.view(torch.uint8))
            if rowwise:
                same = same and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
            us = gpu_us(launch)
            print(f"{block_m:>8} {block_k:>8} {warps:>6} {us:7.1f} {moved / us / 1e6:6.2f}  {same}")


if __name__ == "__main__":
    main()
