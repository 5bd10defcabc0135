"""Shared test utilities: adversarial inputs, bit comparisons, SQNR."""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (for exact comparisons that treat NaN == NaN)."""
    t = t.contiguous()
    if t.element_size() == 1:
        return t.view(torch.uint8)
    if t.element_size() == 2:
        return t.view(torch.int16)
    if t.element_size() == 4:
        return t.view(torch.int32)
    return t.view(torch.int64)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    ba, bb = bits(a), bits(b)
    # canonicalize NaN payloads: any NaN equals any NaN
    if a.is_floating_point():
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        assert torch.equal(na, nb), f"{what}: NaN positions differ"
        ba, bb = ba[~na], bb[~nb]
    diff = (ba != bb).sum().item()
    assert diff == 0, f"{what}: {diff} of {ba.numel()} elements differ"


def adversarial(shape: tuple[int, ...], dtype=torch.float32, seed: int = 0, device=None) -> torch.Tensor:
    """Random values spanning 1e-30..1e30 with zeros, ±inf, NaN, fp32 subnormals and tiny/huge values mixed in."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    x = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-69, 69, generator=g))  # ~1e-30..1e30
    if n >= 16:
        idx = torch.randperm(n, generator=g)
        specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-42, 1e-45, 3e38, -3e38, 1.0]
        for i, v in enumerate(specials):
            x[idx[i]] = v
        x[idx[len(specials): len(specials) + n // 8]] = 0.0
    return x.reshape(shape).to(dtype=dtype, device=device)


def finite_random(shape, dtype=torch.float32, seed: int = 0, scale_range=(-6.0, 6.0), device=None) -> torch.Tensor:
    """Finite random values with magnitudes spread over 10^scale_range (no specials)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.pow(10.0, torch.empty(shape).uniform_(*scale_range, generator=g))
    return x.to(dtype=dtype, device=device)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))
