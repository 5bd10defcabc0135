"""The torch-side exact-rounding helpers (fp8coat._numerics)."""

import math

import numpy as np
import torch

from fp8coat._numerics import div64, f32, ieee_div, ieee_sqrt, sqrt64


def test_f32_rounds_like_a_float32_tensor():
    rng = np.random.default_rng(0)
    values = list(rng.standard_normal(2000) * np.exp2(rng.integers(-160, 140, 2000)))
    fmax = float(torch.finfo(torch.float32).max)
    values += [0.0, -0.0, 1e-50, -1e-50, 2.0**-149, 2.0**-150, 1.5 * 2.0**-149, 0.1, 1 - 1e-9, 0.044715, fmax,
               math.nextafter(fmax, math.inf), fmax * (1 + 2.0**-25), fmax * (1 + 2.0**-24), 1e39, -1e300,
               math.inf, -math.inf]
    for v in values:
        want = float(torch.tensor(v, dtype=torch.float32))
        got = f32(v)
        assert math.copysign(1.0, got) == math.copysign(1.0, want) and (got == want), v
    assert math.isnan(f32(math.nan))


def test_divisions_and_roots_are_correctly_rounded():
    x = torch.rand(1000, dtype=torch.float64) * 1e3
    assert torch.equal(div64(x, 7), torch.from_numpy(x.numpy() / 7.0))
    assert torch.equal(sqrt64(x), torch.from_numpy(np.sqrt(x.numpy())))
    xf = x.float()
    assert torch.equal(ieee_div(xf, 3.0), torch.from_numpy((xf.numpy() / np.float32(3.0)).astype(np.float32)))
    assert torch.equal(ieee_sqrt(xf), torch.from_numpy(np.sqrt(xf.numpy())))
