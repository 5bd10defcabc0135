"""The FP8 second moment's drift at high beta2 (benchmarks.moment_drift) and the optimizer's guard against it: the
default beta2, and the warning for a group that stores FP8 v at a beta2 above ``FP8_V_MAX_BETA2``."""

import warnings

import pytest
import torch

import fp8coat
from benchmarks import moment_drift
from fp8coat.optim.adamw import FP8_V_MAX_BETA2


def test_fp8_v_drifts_at_beta2_0999_and_tracks_torch_at_095():
    # heavy-tailed gradients, 1,500 steps: at 0.999 the decoded v falls well below torch's and the steps grow
    high = moment_drift.drift(0.999, "heavy", steps=1500, rows=16)
    assert high["v_ratio_median"] < 0.8 and high["update_ratio"] > 1.15, high
    # at the default 0.95 (and at the limit) v stays within a few percent of torch's
    for beta2, tol in ((0.95, 0.02), (FP8_V_MAX_BETA2, 0.05)):
        low = moment_drift.drift(beta2, "heavy", steps=1500, rows=16)
        assert abs(low["v_ratio_median"] - 1) < tol and abs(low["update_ratio"] - 1) < tol, low


def test_drift_rejects_an_unknown_stream():
    with pytest.raises(ValueError, match="stream"):
        moment_drift.drift(0.9, "bursty", steps=10)


def _warnings_of(**kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp8coat.AdamW(**kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_default_beta2_and_the_warning_above_the_limit():
    big, small = torch.nn.Parameter(torch.zeros(64, 128)), torch.nn.Parameter(torch.zeros(64))
    opt = fp8coat.AdamW([big])
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert _warnings_of(params=[big]) == [] and _warnings_of(params=[big], betas=(0.9, FP8_V_MAX_BETA2)) == []
    (message,) = _warnings_of(params=[big], betas=(0.9, 0.999))
    assert "betas[1]=0.999" in message and "drift" in message and "optimizer_state_error.md" in message
    # fp32 moments (a 1-D or small parameter, or min_quantized_numel above it) do not drift: no warning
    assert _warnings_of(params=[small], betas=(0.9, 0.999)) == []
    assert _warnings_of(params=[big], betas=(0.9, 0.999), min_quantized_numel=10**9) == []
    # a group added later, with its own beta2, is checked too
    opt = fp8coat.AdamW([small], betas=(0.9, 0.999))
    with pytest.warns(UserWarning, match=r"betas\[1\]=0.9999"):
        opt.add_param_group({"params": [big], "betas": (0.9, 0.9999)})
