"""Rebuilding a linear input from its producer's FP8 tensors (``fp8coat.ops.recompute``): the Triton kernel
(fused, and unfused = x̂ then quantize-transpose) against the torch reference, and the reference against a direct
fp32 computation. Runs the kernels in the interpreter on CPU and natively on CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import adversarial, assert_bit_equal, device, finite_random

from fp8coat.formats import E4M3
from fp8coat.ops.recompute import recompute_input, recompute_quantized_t
from fp8coat.quantization import dequantize_per_group, quantize_per_group, scale_from_amax, tensor_amax

pytest.importorskip("triton")

SHAPES = [(64, 64), (37, 48), (3, 21, 200), (130, 16), (1, 1, 40), (0, 32)]


def _sources(kind: str, shape, group: int, seed: int, special: bool, weight: bool = True):
    dev = device()
    make = adversarial if special else finite_random
    x = make(shape, seed=seed, device=dev)
    xq, xs = quantize_per_group(x, "e4m3", group)
    if kind == "swiglu":
        u = make(shape, seed=seed + 1, device=dev)
        uq, us = quantize_per_group(u, "e4m3", group)
        return [xq, xs, uq, us]
    rstd = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(seed)).to(dev) * 3
    if kind == "layernorm":
        gen = torch.Generator().manual_seed(seed + 3)
        w, b = (torch.randn(shape[-1], generator=gen) * 2).to(dev, torch.bfloat16), torch.randn(
            shape[-1], generator=gen).to(dev, torch.bfloat16)
        return [xq, xs, rstd, w, b]
    src = [xq, xs, rstd]
    if weight:
        src.append((torch.randn(shape[-1], generator=torch.Generator().manual_seed(seed + 2)) * 2)
                   .to(dev, torch.bfloat16))
    return src


def _scale(src, kind, group, dtype):
    x = recompute_input(kind, src, group, dtype)
    return scale_from_amax(torch.nan_to_num(tensor_amax(x), posinf=1e4).clamp(min=1e-3), E4M3)


def _code_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in FP8 code steps (same sign: the E4M3 bit patterns are monotone in magnitude)."""
    ia, ib = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    same_sign = (ia >> 7) == (ib >> 7)
    return torch.where(same_sign, ((ia & 0x7F) - (ib & 0x7F)).abs(), 255)


@pytest.mark.parametrize("kind,weight", [("rmsnorm", True), ("rmsnorm", False), ("swiglu", True),
                                         ("layernorm", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("special", [False, True])
def test_triton_matches_reference(kind, weight, dtype, special):
    for i, shape in enumerate(SHAPES):
        src = _sources(kind, shape, 16, seed=10 * i, special=special, weight=weight)
        s = _scale(src, kind, 16, dtype) if shape[0] else torch.tensor(1.0, device=device())
        ref = recompute_quantized_t(kind, src, 16, dtype, s, backend="torch")
        m = 1
        for d in shape[:-1]:
            m *= d
        assert ref.shape == (shape[-1], -(-m // 16) * 16)
        for fused in (True, False):
            got = recompute_quantized_t(kind, src, 16, dtype, s, backend="triton", fused=fused)
            what = f"{kind} w={weight} {dtype} {shape} fused={fused}"
            if kind in ("rmsnorm", "layernorm"):  # products and sums only: bit-exact
                assert_bit_equal(ref, got, what)
            else:  # exp() of two math libraries: rare one-code differences where x̂ rounds differently
                nan_r, nan_g = torch.isnan(ref.float()), torch.isnan(got.float())
                assert torch.equal(nan_r, nan_g), what
                dist = _code_distance(ref[~nan_r], got[~nan_g])
                if dist.numel():
                    assert int(dist.max()) <= 1, what
                    assert float((dist > 0).float().mean()) <= 2e-3, what
            if m:
                assert not got[:, m:].float().any(), f"{what}: padding not zero"


@pytest.mark.parametrize("group", [16, 32, 128])
def test_group_sizes(group):
    src = _sources("swiglu", (48, 256), group, seed=3, special=False)
    s = _scale(src, "swiglu", group, torch.bfloat16)
    ref = recompute_quantized_t("swiglu", src, group, torch.bfloat16, s, backend="torch")
    got = recompute_quantized_t("swiglu", src, group, torch.bfloat16, s, backend="triton")
    assert int(_code_distance(ref, got).max()) <= 1


def test_reference_against_direct_fp32():
    """x̂ = silu(g)·u, (x·rstd)·w and (x·rstd)·w + b (x: the centered input) from the dequantized tensors, in fp32,
    to within about one bf16 rounding."""
    shape = (33, 80)
    src = _sources("swiglu", shape, 16, seed=5, special=False)
    g = dequantize_per_group(src[0], src[1], 16).double()
    u = dequantize_per_group(src[2], src[3], 16).double()
    want = torch.nn.functional.silu(g) * u
    got = recompute_input("swiglu", src, 16, torch.bfloat16).double()
    assert torch.allclose(got, want, rtol=2**-8, atol=1e-30)
    src = _sources("rmsnorm", shape, 16, seed=6, special=False)
    x = dequantize_per_group(src[0], src[1], 16).double()
    want = x * src[2].double().unsqueeze(-1) * src[3].double()
    got = recompute_input("rmsnorm", src, 16, torch.bfloat16).double()
    assert torch.allclose(got, want, rtol=2**-8, atol=1e-30)
    src = _sources("layernorm", shape, 16, seed=7, special=False)
    x = dequantize_per_group(src[0], src[1], 16).double()
    want = x * src[2].double().unsqueeze(-1) * src[3].double() + src[4].double()
    got = recompute_input("layernorm", src, 16, torch.bfloat16).double()
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-6)


def test_bad_input():
    src = _sources("rmsnorm", (4, 32), 16, seed=0, special=False)
    s = torch.tensor(1.0, device=device())
    with pytest.raises(ValueError, match="unknown recompute kind"):
        recompute_quantized_t("groupnorm", src, 16, torch.bfloat16, s)
    with pytest.raises(ValueError, match="takes 5"):
        recompute_quantized_t("layernorm", src, 16, torch.bfloat16, s)
    with pytest.raises(ValueError, match="takes 4"):
        recompute_quantized_t("swiglu", src[:3], 16, torch.bfloat16, s)
    with pytest.raises(ValueError, match="unsupported input dtype"):
        recompute_quantized_t("rmsnorm", src, 16, torch.float64, s, backend="triton")
