"""GPU diagnostics for the FP8 linear op: a kernel-time breakdown of fwd+bwd at a Llama-7B shape, and checks of the
quantize-transpose kernel and torch._scaled_mm against the torch reference for fp32 inputs and odd token counts.

    python -m scripts.profile_linear_gpu [--no-checks] [--no-profile]   # prints tables; needs an FP8 CUDA GPU

The host-vs-GPU table tells whether one fwd+bwd is host-bound (host ≈ wall > GPU busy) or GPU-bound.
"""

import torch
from torch.profiler import ProfilerActivity, profile

from fp8coat.ops.linear import FP8WeightCache, fp8_mm, linear
from fp8coat.quantization import quantize_transpose, scale_from_amax, tensor_amax


def check_fp32_paths():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for m, n in ((132, 128), (144, 128), (132, 48)):
            g = torch.randn(m, n, device="cuda", dtype=dtype)
            for fmt in ("e5m2", "e4m3"):
                s = scale_from_amax(tensor_amax(g), __import__("fp8coat").get_format(fmt))
                qa, qta = quantize_transpose(g, fmt, s, backend="torch")
                qb, qtb = quantize_transpose(g, fmt, s, backend="triton")
                same_q = torch.equal(qa.view(torch.uint8), qb.view(torch.uint8))
                same_qt = torch.equal(qta.view(torch.uint8), qtb.view(torch.uint8))
                nan_b = torch.isnan(qb.float()).any().item()
                w = torch.randn(64, n, device="cuda")
                wq, sw = __import__("fp8coat").quantization.quantize_per_tensor(w, "e4m3")
                for out in (torch.float32, torch.bfloat16):
                    real = fp8_mm(qa, s, wq.t().contiguous().t().contiguous(), sw, out)
                    emu = fp8_mm(qa, s, wq.t().contiguous().t().contiguous(), sw, out, emulate=True)
                    print(f"{dtype} m={m} n={n} {fmt} out={out}: q equal {same_q}, qt equal {same_qt}, nan {nan_b}, "
                          f"scaled_mm nan {torch.isnan(real).any().item()}, max|real-emu| "
                          f"{(real.float() - emu.float()).abs().max().item():.3e}", flush=True)


def _gpu_busy_ms(fn, iters: int) -> "tuple[float, float]":
    """(GPU busy ms per call, kernels per call) of ``fn`` from the profiler's CUDA kernel events."""
    from torch.autograd import DeviceType

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = [e.device_time_total / 1e3 for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(times) / iters, len(times) / iters


def host_vs_gpu(m=8192, k=4096, n=4096, iters=20):
    """Per fwd+bwd call: host time (the call returns before the GPU finishes), wall time back to back, and GPU
    busy time, for BF16 F.linear and the FP8 linear with the weight cache cleared / kept. wall ≈ host > GPU busy
    means host-bound."""
    import time

    import torch.nn.functional as F

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    cache = FP8WeightCache()

    def fp8(clear):
        if clear:
            cache.clear()
        return torch.autograd.grad(linear(x, w, cache=cache), [x, w], gy)

    variants = {"bf16": lambda: torch.autograd.grad(F.linear(x, w), [x, w], gy),
                "fp8": lambda: fp8(True), "fp8_cached": lambda: fp8(False)}
    print(f"\nlinear {k}->{n}, {m} tokens, fwd+bwd (dX, dW), {iters} calls:")
    print(f"{'variant':>12} {'host ms':>8} {'wall ms':>8} {'GPU busy':>9} {'kernels':>8}")
    for name, fn in variants.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        host = []
        for _ in range(iters):  # host time of one call while the GPU is still working on earlier ones
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / iters
        busy, kernels = _gpu_busy_ms(fn, iters)
        host.sort()
        print(f"{name:>12} {host[len(host) // 2]:8.3f} {wall:8.3f} {busy:9.3f} {kernels:8.1f}")


def profile_linear(m=8192, k=4096, n=4096):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cache = FP8WeightCache()
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        linear(x, w, cache=cache).backward(gy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            linear(x, w, cache=cache).backward(gy)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    import sys

    if "--no-checks" not in sys.argv:
        check_fp32_paths()
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        host_vs_gpu(k=k, n=n)
    if "--no-profile" not in sys.argv:
        profile_linear()
