"""GPU diagnostics for the FP8 linear op: a kernel-time breakdown of fwd+bwd at a Llama-7B shape, and checks of the
quantize-transpose kernel and torch._scaled_mm against the torch reference for fp32 inputs and odd token counts.

    python3 scripts/profile_linear_gpu.py        # prints tables; needs a CUDA GPU with FP8 support
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

    check_fp32_paths()
    if "--no-profile" not in sys.argv:
        profile_linear()
