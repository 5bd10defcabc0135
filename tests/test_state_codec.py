"""FP8 optimizer-state codec with dynamic range expansion (torch reference)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import finite_random

from fp8coat.formats import E4M3, E5M2
from fp8coat.optim import state_codec as codec


def _rel_err(x, xh):
    nz = x != 0
    return ((xh[nz] - x[nz]) / x[nz]).abs()


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_expansion_maps_group_range_onto_fp8(fmt):
    # each row: one 128-group with a known dynamic range R
    ranges = torch.tensor([1.0, 2.0, 10.0, 1e3, 1e5, 1e8, 1e12])
    g = torch.Generator().manual_seed(0)
    rows = []
    for r in ranges:
        v = torch.exp(torch.empty(128).uniform_(0, math.log(r.item()) if r > 1 else 0, generator=g))
        v[0], v[1] = 1.0, r  # pin min and max
        rows.append(v * torch.where(torch.rand(128, generator=g) < 0.5, -1.0, 1.0) * 1e-3)
    x = torch.stack(rows)
    q, absmax, expo = codec.encode(x, fmt, 128, expand=True)
    assert q.dtype == fmt.dtype and absmax.shape == (7, 1) and expo.dtype == torch.uint8
    assert torch.allclose(absmax[:, 0], x.abs().amax(1))
    k = expo[:, 0].float() / 16
    target = fmt.max * fmt.max / 2
    for i, r in enumerate(ranges.tolist()):
        if r == 1.0:
            assert expo[i, 0] == codec.MAX_EXPO
            continue
        assert r ** k[i].item() <= target * (1 + 1e-5)  # the floor keeps the expanded range inside FP8's
        if expo[i, 0] < codec.MAX_EXPO:
            assert r ** (k[i].item() + 1 / 16) > target * (1 - 1e-5)  # and k is the largest such multiple of 1/16
    assert torch.all(q.float().abs().amax(1) == fmt.max)
    xh = codec.decode(q, absmax, expo, fmt, 128)
    assert torch.isfinite(xh).all()
    # relative error per element: E4M3 has 3 mantissa bits; after expansion by k the error shrinks by ~1/k
    rel = _rel_err(x, xh)
    assert rel.max() < (0.5 if fmt is E4M3 else 0.6)


def test_min_ignores_zeros_correctly():
    """A zero anywhere in a group (COAT's kernel: element 0 or a subtree root) must not change k."""
    g = torch.Generator().manual_seed(1)
    base = (torch.rand(128, generator=g) + 0.1) * 1e-4
    for zero_at in (0, 8, 16, 64, 127):
        x = base.clone()
        x[zero_at] = 0.0
        ref = base.clone()
        ref[zero_at] = base[(zero_at + 1) % 128]  # same min/max, no zero
        _, _, expo = codec.encode(x[None], E4M3, 128, True)
        _, _, expo_ref = codec.encode(ref[None], E4M3, 128, True)
        assert expo.item() == expo_ref.item(), zero_at
        q, a, e = codec.encode(x[None], E4M3, 128, True)
        assert codec.decode(q, a, e, E4M3, 128)[0, zero_at] == 0.0


@pytest.mark.parametrize("expand", [True, False])
def test_zeros_all_zero_groups_and_partial_groups(expand):
    x = finite_random((3, 300), seed=2)
    x[0] = 0.0  # all-zero row: three all-zero groups
    x[1, 5:50] = 0.0
    q, absmax, expo = codec.encode(x, E4M3, 128, expand)
    assert absmax.shape == (3, 3)
    xh = codec.decode(q, absmax, expo, E4M3, 128)
    assert torch.equal(xh[0], torch.zeros(300))
    assert torch.all(xh[1, 5:50] == 0)
    assert torch.isfinite(xh).all()
    assert torch.all(xh[x == 0] == 0)
    if expand:  # expansion keeps every non-zero value non-zero, even across 12 decades in one group
        assert torch.all(xh[x != 0] != 0)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_extreme_finite_values_never_produce_nan_or_inf(fmt):
    for lo, hi in [(-30, -25), (-45, -38), (25, 30), (-30, 30), (-44, 37)]:
        x = finite_random((4, 256), seed=lo + hi, scale_range=(lo, hi))
        x[:, :7] = 0.0
        for expand in (True, False):
            q, absmax, expo = codec.encode(x, fmt, 128, expand)
            xh = codec.decode(q, absmax, expo, fmt, 128)
            assert torch.isfinite(xh).all(), (lo, hi, expand)
            bound = absmax.repeat_interleave(128, 1)
            normal = bound >= fmt.max * 2.0**-126  # tinier groups round on a fixed grid of step 2^-126-ish
            assert torch.all(xh.abs()[normal] <= bound[normal] * (1 + 1e-6))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_values_at_the_optimizer_moment_bounds_stay_finite(fmt):
    """fp8coat.AdamW clamps |m| to 2^63 and v to 2^126 (step_reference.M_BOUND / V_BOUND); groups holding those
    bounds next to ordinary and tiny values must encode and decode to finite values no larger than the bound."""
    from fp8coat.optim.step_reference import M_BOUND, V_BOUND

    for bound, signed in ((M_BOUND, True), (V_BOUND, False)):
        x = finite_random((4, 256), seed=7, scale_range=(-30, 0)).abs()
        if signed:
            x = x * torch.where(torch.rand(4, 256, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
        x[:, 0] = bound
        x[0] = bound  # a group of equal values at the bound
        x[1, 200] = -bound if signed else bound
        for expand in (True, False):
            q, absmax, expo = codec.encode(x, fmt, 128, expand)
            xh = codec.decode(q, absmax, expo, fmt, 128)
            assert torch.isfinite(xh).all(), (bound, expand)
            assert (xh.abs() <= bound).all(), (bound, expand)
            assert torch.equal(xh[0], x[0])


def test_non_finite_input_is_loud():
    x = finite_random((2, 128), seed=3)
    x[0, 5] = float("nan")
    x[1, 9] = float("inf")
    for expand in (True, False):
        q, absmax, expo = codec.encode(x, E4M3, 128, expand)
        xh = codec.decode(q, absmax, expo, E4M3, 128)
        assert not torch.isfinite(xh[0]).all() and not torch.isfinite(xh[1]).all()


def test_expansion_reduces_error_on_narrow_range_groups():
    """Adam's moments fill little of FP8's range per group (COAT Fig. 2: v spans ~1e1, m ~1e3). There
    expansion must cut the MSE well below plain absmax (the expected gain is about k² for range R, k = log_R T)."""
    g = torch.Generator().manual_seed(4)
    v_like = torch.exp(torch.empty(64, 512).uniform_(0, math.log(10.0), generator=g)) * 1e-6
    m_like = torch.exp(torch.empty(64, 512).uniform_(0, math.log(1e3), generator=g)) * 1e-3
    m_like = m_like * torch.where(torch.rand(64, 512, generator=g) < 0.5, -1.0, 1.0)
    for x, min_gain in ((v_like, 10.0), (m_like, 2.0)):
        errs = {}
        for expand in (True, False):
            xh = codec.decode(*codec.encode(x, E4M3, 128, expand), E4M3, 128)
            errs[expand] = (xh - x).pow(2).mean().item()
        assert errs[False] > min_gain * errs[True], errs


def test_side_shapes_and_constants():
    assert codec.side_shape((4096, 11008), 128) == (4096, 86)
    assert codec.side_shape((3, 5, 129), 128) == (3, 5, 2)
    assert codec.side_shape((), 128) == (1,)
    assert abs(codec.expand_constant(E4M3) - 16 * math.log2(448 * 448 / 2)) < 1e-4
