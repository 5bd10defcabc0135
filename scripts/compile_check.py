"""Compile fp8coat's Triton kernels for Hopper (sm_90) on a machine without a GPU and report what the code does.

Mirrors the JIT's argument specialization (pointers 16-byte aligned, ints equal to 1 become constants, ints
divisible by 16 carry a divisibility hint), compiles through ptxas, and prints per kernel: registers, spills,
shared memory, and how many global loads/stores are vectorized. A compile error here is a compile error on the
GPU, found without spending GPU time.

    python -m scripts.compile_check           # all kernels at representative arguments
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
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float8_e4m3fn: "*fp8e4nv",
    torch.float8_e5m2: "*fp8e5",
    torch.float64: "*fp64",
    torch.uint8: "*u8",
    torch.int16: "*i16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int = 4, **options):
    """Compile ``fn`` (a ``triton.jit`` function, or a ``FastKernel`` around one) for sm_90 with JIT-like
    specialization of ``args``."""
    fn = getattr(fn, "fn", fn)
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
        elif isinstance(v, (bool, int)):
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
    vec = lambda xs: sum(1 for x in xs if ".v2" in x or ".v4" in x or ".v8" in x)
    regs = spills = "?"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "k.o")],
            check=False,
            capture_output=True,
            text=True,
        ).stderr
        m = re.search(r"Used (\d+) registers", out)
        regs = int(m.group(1)) if m else "?"
        m = re.search(r"(\d+) bytes spill stores", out)
        spills = int(m.group(1)) if m else "?"
    row = {
        "kernel": name,
        "regs": regs,
        "spill_bytes": spills,
        "shared": kernel.metadata.shared,
        "loads": len(loads),
        "vec_loads": vec(loads),
        "stores": len(stores),
        "vec_stores": vec(stores),
    }
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def _activation_rows() -> list:
    """FP8-saving activations (fp8coat.ops.activations) at a Llama-7B MLP shape, 8192 x 11008 bf16."""
    from fp8coat.formats import E4M3
    from fp8coat.ops import activation_kernels as act
    from fp8coat.ops.activations import ACTIVATIONS

    r, k, g = 8192, 11008, 16
    ng = k // g
    block_r, block_k = act._tiles(r, k, g, on_gpu=True)
    k_tiles = triton.cdiv(k, block_k)
    x = torch.empty(r, k, dtype=torch.bfloat16)
    q = torch.empty(r, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(r, ng, dtype=torch.float32)
    rows = []
    for name, code, gated in [
        ("swiglu", ACTIVATIONS["silu"], True),
        ("gelu", ACTIVATIONS["gelu"], False),
        ("gelu tanh", ACTIVATIONS["gelu_tanh"], False),
    ]:
        rows.append(
            report(
                f"{name} fwd {r}x{k} bf16 tile={block_r}x{block_k}",
                compile_sm90(
                    act._act_fwd_kernel,
                    {
                        "x_ptr": x,
                        "u_ptr": x,
                        "out_ptr": x,
                        "xq_ptr": q,
                        "xs_ptr": s,
                        "uq_ptr": q,
                        "us_ptr": s,
                        "amax_ptr": torch.empty((), dtype=torch.int32),
                        "R": r,
                        "K": k,
                        "NG": ng,
                        "K_TILES": k_tiles,
                        "stride_xr": k,
                        "stride_xk": 1,
                        "stride_ur": k,
                        "stride_uk": 1,
                    },
                    {
                        "ACT": code,
                        "GATED": gated,
                        "FMAX": E4M3.max,
                        "G": g,
                        "BLOCK_R": block_r,
                        "BLOCK_K": block_k,
                        "LIBDEVICE": True,
                    },
                    num_warps=act._GPU_TILE[2],
                    enable_fp_fusion=False,
                ),
            )
        )
        rows.append(
            report(
                f"{name} bwd {r}x{k} bf16 tile={block_r}x{block_k}",
                compile_sm90(
                    act._act_bwd_kernel,
                    {
                        "dy_ptr": x,
                        "xq_ptr": q,
                        "xs_ptr": s,
                        "uq_ptr": q,
                        "us_ptr": s,
                        "dx_ptr": x,
                        "du_ptr": x,
                        "amax_ptr": torch.empty((), dtype=torch.int32),
                        "R": r,
                        "K": k,
                        "NG": ng,
                        "K_TILES": k_tiles,
                        "stride_dr": k,
                        "stride_dk": 1,
                    },
                    {"ACT": code, "GATED": gated, "AMAX": gated, "G": g, "BLOCK_R": block_r, "BLOCK_K": block_k,
                     "LIBDEVICE": True},
                    num_warps=act._GPU_TILE[2],
                    enable_fp_fusion=False,
                ),
            )
        )
    return rows


def _norm_rows(r: int = 8192, h: int = 4096) -> list:
    """RMSNorm / LayerNorm with FP8-saved input (fp8coat.ops.norms), forward and backward, r x h bf16."""
    from fp8coat.formats import E4M3
    from fp8coat.ops import norms_kernels as norms

    g = 16
    ng = triton.cdiv(h, g)
    block_r, block_h, warps = norms._tiles(r, h, g, backward=False)
    warps_bwd = norms._tiles(r, h, g, backward=True)[2]
    x = torch.empty(r, h, dtype=torch.bfloat16)
    q = torch.empty(r, h, dtype=torch.float8_e4m3fn)
    s = torch.empty(r, ng, dtype=torch.float32)
    stat = torch.empty(r, dtype=torch.float32)
    w = torch.empty(h, dtype=torch.bfloat16)
    part = torch.empty(264, h, dtype=torch.float64)
    rows = []
    for name, ln in [("rmsnorm", False), ("layernorm", True)]:
        rows.append(
            report(
                f"{name} fwd {r}x{h} bf16 tile={block_r}x{block_h} warps={warps}",
                compile_sm90(
                    norms._norm_fwd_kernel,
                    {
                        "x_ptr": x,
                        "w_ptr": w,
                        "b_ptr": w,
                        "y_ptr": x,
                        "q_ptr": q,
                        "s_ptr": s,
                        "rstd_ptr": stat,
                        "amax_ptr": torch.empty((), dtype=torch.int32),
                        "R": r,
                        "H": h,
                        "NG": ng,
                        "stride_xr": h,
                        "stride_xh": 1,
                        "eps": 1e-6,
                    },
                    {
                        "LAYERNORM": ln,
                        "HAS_W": True,
                        "HAS_B": ln,
                        "FMAX": E4M3.max,
                        "G": g,
                        "BLOCK_R": block_r,
                        "BLOCK_H": block_h,
                    },
                    num_warps=warps,
                    enable_fp_fusion=False,
                ),
            )
        )
        rows.append(
            report(
                f"{name} bwd {r}x{h} bf16 tile={block_r}x{block_h} warps={warps_bwd}",
                compile_sm90(
                    norms._norm_bwd_kernel,
                    {
                        "dy_ptr": x,
                        "q_ptr": q,
                        "s_ptr": s,
                        "rstd_ptr": stat,
                        "w_ptr": w,
                        "dx_ptr": x,
                        "dw_ptr": part,
                        "db_ptr": part,
                        "R": r,
                        "H": h,
                        "NG": ng,
                        "stride_dyr": h,
                        "stride_dyh": 1,
                        "n_blocks": triton.cdiv(r, block_r),
                    },
                    {"LAYERNORM": ln, "HAS_W": True, "HAS_DB": ln, "G": g, "BLOCK_R": block_r, "BLOCK_H": block_h},
                    num_warps=warps_bwd,
                    enable_fp_fusion=False,
                ),
            )
        )
    return rows


def main() -> int:
    import triton.language as tl

    from fp8coat.formats import E4M3, E5M2
    from fp8coat.optim import step_triton as st
    from fp8coat.quantization import triton_kernels as qk

    rows = []
    x = torch.empty(4096, 4096, dtype=torch.bfloat16)
    q = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn)
    s = torch.empty(4096, 256, dtype=torch.float32)
    block_r, block_k = qk._tiles(4096, 4096, 16)
    common = {"R": 4096, "K": 4096, "stride_xr": 4096, "stride_xk": 1}
    rows.append(
        report(
            "group_quant G=16",
            compile_sm90(
                qk._group_quant_kernel,
                dict(x_ptr=x, q_ptr=q, s_ptr=s, NG=256, **common),
                {"FMAX": E4M3.max, "G": 16, "BLOCK_R": block_r, "BLOCK_K": block_k},
            ),
        )
    )
    rows.append(
        report(
            "group_dequant G=16",
            compile_sm90(
                qk._group_dequant_kernel,
                {
                    "q_ptr": q,
                    "s_ptr": s,
                    "x_ptr": x,
                    "R": 4096,
                    "K": 4096,
                    "NG": 256,
                    "stride_qr": 4096,
                    "stride_qk": 1,
                },
                {"G": 16, "BLOCK_R": block_r, "BLOCK_K": block_k},
            ),
        )
    )
    part = torch.empty(qk.AMAX_PROGRAMS, dtype=torch.float32)
    one = torch.empty((), dtype=torch.float32)
    flag = torch.empty((), dtype=torch.int32)
    counter = torch.empty(1, dtype=torch.int32)
    tiles_k = triton.cdiv(4096, block_k)
    for scale in (False, True):
        rows.append(
            report(
                f"amax{' -> scale' if scale else ''} (programs loop over tiles, last one finalizes)",
                compile_sm90(
                    qk._amax_kernel,
                    dict(
                        x_ptr=x,
                        part_ptr=part,
                        count_ptr=counter,
                        out_ptr=one,
                        TILES_K=tiles_k,
                        TILES=tiles_k * 4096 // block_r,
                        **common,
                    ),
                    {
                        "FMAX": E4M3.max,
                        "SCALE": scale,
                        "PRIOR": False,
                        "BLOCK_R": block_r,
                        "BLOCK_K": block_k,
                        "BLOCK": qk.AMAX_PROGRAMS,
                    },
                ),
            )
        )
    rows.append(
        report(
            "scaled_quant e5m2",
            compile_sm90(
                qk._scaled_quant_kernel,
                dict(x_ptr=x, s_ptr=one, q_ptr=q.view(torch.float8_e5m2), flag_ptr=flag, **common),
                {"FMAX": E5M2.max, "CONDITIONAL": False, "BLOCK_R": block_r, "BLOCK_K": block_k},
            ),
        )
    )

    rows += _activation_rows()
    rows += _norm_rows()

    qt = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn)
    rows.append(
        report(
            "quant_transpose",
            compile_sm90(
                qk._quant_transpose_kernel,
                {
                    "x_ptr": x,
                    "s_ptr": one,
                    "q_ptr": q,
                    "qt_ptr": qt,
                    "M": 4096,
                    "K": 4096,
                    "M_pad": 4096,
                    "stride_xm": 4096,
                    "stride_xk": 1,
                    "stride_qm": 4096,
                    "stride_qtk": 4096,
                },
                {"FMAX": E4M3.max, "ROWWISE": True, "TRANSPOSED": True, "BLOCK_M": 64, "BLOCK_K": 64},
            ),
        )
    )
    from fp8coat.ops import recompute_kernels as rk

    rstd = torch.empty(4096, dtype=torch.float32)
    for name, kind in (("recompute rmsnorm+weight -> fp8 transposed", 1), ("recompute swiglu -> fp8 transposed", 2)):
        rows.append(
            report(
                name,
                compile_sm90(
                    rk._recompute_kernel,
                    {
                        "a_q": q,
                        "a_s": s,
                        "b_q": q,
                        "b_s": s,
                        "rstd_ptr": rstd,
                        "w_ptr": x,
                        "scale_ptr": one,
                        "out_ptr": qt,
                        "M": 4096,
                        "K": 4096,
                        "NG": 256,
                        "M_PAD": 4096,
                    },
                    {
                        "KIND": kind,
                        "ROUND": 1,
                        "STORE_T": True,
                        "FMAX": E4M3.max,
                        "G": 16,
                        "BLOCK_M": 64,
                        "BLOCK_K": 128,
                        "LIBDEVICE": True,
                    },
                    num_warps=8,
                    enable_fp_fusion=False,
                ),
            )
        )

    table = torch.empty(9, 64, dtype=torch.int64)
    meta = torch.empty(5, 64, dtype=torch.int64)
    BG, warps = int(os.environ.get("BG", "8")), int(os.environ.get("WARPS", "4"))
    for name, master, p_dt, g_dt, expand, flat, ieee, amax in [
        ("adamw fp32 dre", 0, tl.float32, tl.float32, True, True, True, False),
        ("adamw fp32 dre approx-math", 0, tl.float32, tl.float32, True, True, False, False),
        ("adamw fp32 dre ragged", 0, tl.float32, tl.float32, True, False, True, False),
        ("adamw fp32 plain", 0, tl.float32, tl.float32, False, True, True, False),
        ("adamw bf16-remainder dre", 1, tl.int16, tl.bfloat16, True, True, True, False),
        ("adamw bf16-stochastic dre", 2, tl.int16, tl.bfloat16, True, True, True, False),
        # recording the new weights' amax (fp8coat.AdamW(record_amax_of=...))
        ("adamw bf16-remainder dre amax", 1, tl.int16, tl.bfloat16, True, True, True, True),
        ("adamw bf16-stochastic dre amax", 2, tl.int16, tl.bfloat16, True, True, True, True),
        ("adamw bf16 none dre ragged amax", 0, tl.bfloat16, tl.bfloat16, True, False, True, True),
        ("adamw fp32 dre amax", 0, tl.float32, tl.float32, True, True, True, True),
    ]:
        rows.append(
            report(
                f"{name} BG={BG} warps={warps}",
                compile_sm90(
                    st._adamw_step_kernel,
                    {
                        "table": table,
                        "meta": meta,
                        "prog_tensor": torch.empty(64, dtype=torch.int32),
                        "NT": 45,
                        "lr_ptr": one,
                        "lr_value": 1e-3,
                        "seed": 7,
                        "count_ptr": torch.empty((), dtype=torch.int64),
                        "amax_ptr": torch.empty(64, dtype=torch.int32) if amax else meta,
                        "one_minus_beta1": 0.1,
                        "beta1": 0.9,
                        "beta2": 0.95,
                        "one_minus_beta2": 0.05,
                        "eps": 1e-8,
                        "weight_decay": 0.1,
                        "bias_correction1": 0.1,
                        "inv_bc2_sqrt": 1.2,
                    },
                    {
                        "P_DT": p_dt,
                        "G_DT": g_dt,
                        "M_DT": tl.float8e4nv,
                        "V_DT": tl.float8e4nv,
                        "M_FP8": True,
                        "V_FP8": True,
                        "EXPAND": expand,
                        "M_FMAX": 448.0,
                        "V_FMAX": 448.0,
                        "M_C": 265.8,
                        "V_C": 265.8,
                        "MASTER": master,
                        "LR_FROM_PTR": False,
                        "MAXIMIZE": False,
                        "LERP_SMALL": True,
                        "G": 128,
                        "BLOCK_GROUPS": BG,
                        "FLAT": flat,
                        "IEEE": ieee,
                        "FAST": True,
                        "COUNT": True,  # non-finite gradient elements counted (fp8coat.AdamW with a count tensor)
                        "AMAX": amax,
                    },
                    num_warps=warps,
                    enable_fp_fusion=False,
                ),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
