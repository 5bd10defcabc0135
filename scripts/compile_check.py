"""Compile fp8coat's Triton kernels for Hopper (sm_90) on a machine without a GPU and report what the code does.

Mirrors the JIT's argument specialization (pointers 16-byte aligned, ints equal to 1 become constants, ints
divisible by 16 carry a divisibility hint), compiles through ptxas, and prints per kernel: registers, spills,
shared memory, and how many global loads/stores are vectorized. A compile error here is a compile error on the
GPU, found without spending GPU time.

    python scripts/compile_check.py            # all kernels at representative arguments
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

_TYPES = {
    torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float8_e4m3fn: "*fp8e4nv",
    torch.float8_e5m2: "*fp8e5", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
}


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int = 4, **options):
    """Compile ``fn`` (a ``triton.jit`` function) for sm_90 with JIT-like specialization of ``args``."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, torch.Tensor):
            signature[name] = _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or isinstance(v, int):
            if v == 1:
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: unsupported argument {type(v)}")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    opts = backend.parse_options({"num_warps": num_warps, **options})
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options=opts.__dict__)


def report(name: str, kernel) -> dict:
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)
    stores = re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx)
    vec = lambda xs: sum(1 for x in xs if ".v2" in x or ".v4" in x or ".v8" in x)  # noqa: E731
    regs = spills = "?"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True).stderr
        m = re.search(r"Used (\d+) registers", out)
        regs = int(m.group(1)) if m else "?"
        m = re.search(r"(\d+) bytes spill stores", out)
        spills = int(m.group(1)) if m else "?"
    row = dict(kernel=name, regs=regs, spill_bytes=spills, shared=kernel.metadata.shared,
               loads=len(loads), vec_loads=vec(loads), stores=len(stores), vec_stores=vec(stores))
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main() -> int:
    from fp8coat.formats import E4M3, E5M2
    from fp8coat.optim import step_triton as st
    from fp8coat.quantization import triton_kernels as qk
    import triton.language as tl

    rows = []
    x = torch.empty(4096, 4096, dtype=torch.bfloat16)
    q = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn)
    s = torch.empty(4096, 256, dtype=torch.float32)
    block_r, block_k = qk._tiles(4096, 4096, 16)
    common = dict(R=4096, K=4096, stride_xr=4096, stride_xk=1)
    rows.append(report("group_quant G=16", compile_sm90(
        qk._group_quant_kernel, dict(x_ptr=x, q_ptr=q, s_ptr=s, NG=256, **common),
        dict(FMAX=E4M3.max, G=16, BLOCK_R=block_r, BLOCK_K=block_k))))
    rows.append(report("group_dequant G=16", compile_sm90(
        qk._group_dequant_kernel, dict(q_ptr=q, s_ptr=s, x_ptr=x, R=4096, K=4096, NG=256, stride_qr=4096,
                                       stride_qk=1), dict(G=16, BLOCK_R=block_r, BLOCK_K=block_k))))
    part = torch.empty(1024, dtype=torch.float32)
    rows.append(report("tile_amax", compile_sm90(
        qk._tile_amax_kernel, dict(x_ptr=x, part_ptr=part, **common), dict(BLOCK_R=block_r, BLOCK_K=block_k))))
    one = torch.empty((), dtype=torch.float32)
    rows.append(report("scaled_quant e5m2", compile_sm90(
        qk._scaled_quant_kernel, dict(x_ptr=x, s_ptr=one, q_ptr=q.view(torch.float8_e5m2), **common),
        dict(FMAX=E5M2.max, BLOCK_R=block_r, BLOCK_K=block_k))))

    table = torch.empty(9, 64, dtype=torch.int64)
    meta = torch.empty(4, 64, dtype=torch.int64)
    BG, warps = int(os.environ.get("BG", 8)), int(os.environ.get("WARPS", 4))
    for name, master, p_dt, g_dt, expand, flat, ieee in [
        ("adamw fp32 dre", 0, tl.float32, tl.float32, True, True, True),
        ("adamw fp32 dre approx-math", 0, tl.float32, tl.float32, True, True, False),
        ("adamw fp32 dre ragged", 0, tl.float32, tl.float32, True, False, True),
        ("adamw fp32 plain", 0, tl.float32, tl.float32, False, True, True),
        ("adamw bf16-remainder dre", 1, tl.int16, tl.bfloat16, True, True, True),
        ("adamw bf16-stochastic dre", 2, tl.int16, tl.bfloat16, True, True, True),
    ]:
        rows.append(report(f"{name} BG={BG} warps={warps}", compile_sm90(
            st._adamw_step_kernel,
            dict(table=table, meta=meta, prog_tensor=torch.empty(64, dtype=torch.int32), NT=45, lr_ptr=one, lr_value=1e-3, seed=7, one_minus_beta1=0.1, beta1=0.9,
                 beta2=0.95, one_minus_beta2=0.05, eps=1e-8, weight_decay=0.1, bias_correction1=0.1,
                 inv_bc2_sqrt=1.2),
            dict(P_DT=p_dt, G_DT=g_dt, M_DT=tl.float8e4nv, V_DT=tl.float8e4nv, M_FP8=True, V_FP8=True,
                 EXPAND=expand, M_FMAX=448.0, V_FMAX=448.0, M_C=265.8, V_C=265.8, MASTER=master,
                 LR_FROM_PTR=False, MAXIMIZE=False, LERP_SMALL=True, G=128, BLOCK_GROUPS=BG, FLAT=flat, IEEE=ieee, FAST=True),
            num_warps=warps, enable_fp_fusion=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
