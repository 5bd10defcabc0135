"""FP8-saved attention inputs: the op ``fp8coat.ops.attention.fp8_attention`` against torch's SDPA.

The op's oracle: its forward is plain SDPA on the original q, k, v (bit for bit); its gradients are autograd's
through SDPA at the dequantized q, k, v (bit for bit: the same SDPA backward on the same tensors); against the
gradients of plain SDPA at the original inputs they keep an SQNR of at least 22 dB (bf16; measured 24-34 dB).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bit_equal, device, sqnr_db

from fp8coat.formats import E4M3
from fp8coat.memory import measure_saved_tensors
from fp8coat.ops.attention import fp8_attention, fp8_attention_with_saved
from fp8coat.quantization import dequantize_per_group, quantize_per_group

# ---------------------------------------------------------------------------------------------------------------
# the op


def _qkv(b=2, h=4, hkv=4, s=24, d=20, dtype=torch.bfloat16, seed=0, sk=None):
    """q (B, H, S, D) as a transposed view of (B, S, H, D), like HF's; k, v (B, Hkv, Sk, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, hkv, sk or s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk or s, d, generator=g).to(dtype)
    return [t.to(device()).requires_grad_() for t in (q, k, v)]


def _dequantized(t: torch.Tensor, group: int = 16) -> torch.Tensor:
    return dequantize_per_group(*quantize_per_group(t.detach(), E4M3, group), group, t.dtype).requires_grad_()


def _check_against_sdpa(q, k, v, mask=None, group=16, **kw):
    """Forward bit-equal to SDPA at (q, k, v); gradients bit-equal to autograd through SDPA at the dequantized
    inputs; returns (gradients, plain SDPA's gradients at the original inputs)."""
    out = fp8_attention(q, k, v, mask, group_size=group, **kw)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    assert_bit_equal(out, plain, "forward")
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    deq = [_dequantized(t, group) for t in (q, k, v)]
    want = torch.autograd.grad(F.scaled_dot_product_attention(*deq, attn_mask=mask, **kw), deq, d_out)
    for name, a, b in zip("qkv", grads, want):
        assert_bit_equal(a, b, f"d{name}")
    return grads, torch.autograd.grad(plain, (q, k, v), d_out)


CASES = {  # name: (_qkv kwargs, mask kind, sdpa kwargs)
    "non-causal": (dict(), None, dict()),
    "causal": (dict(), None, dict(is_causal=True)),
    "gqa causal": (dict(hkv=2), None, dict(is_causal=True, enable_gqa=True)),
    "bool mask": (dict(), "bool", dict()),
    "float mask, gqa": (dict(hkv=1), "float", dict(enable_gqa=True)),
    "scale, cross": (dict(sk=17, d=64), None, dict(scale=0.3)),
    "fp32, D 40": (dict(d=40, dtype=torch.float32), None, dict(is_causal=True)),
}


def _mask(kind, q, k):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=g) > 0.3
    keep[..., 0] = True  # every query row sees a key
    keep = keep.to(q.device)
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(keep.shape, generator=g).to(keep.device), -torch.inf).to(q.dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_forward_is_sdpa_and_gradients_are_sdpa_at_the_dequantized_inputs(case):
    shape_kw, mask_kind, kw = CASES[case]
    q, k, v = _qkv(**shape_kw)
    grads, plain = _check_against_sdpa(q, k, v, _mask(mask_kind, q, k), **kw)
    floor = 22.0 if q.dtype == torch.bfloat16 else 24.0
    for name, a, b in zip("qkv", grads, plain):
        assert sqnr_db(b, a) >= floor, (name, sqnr_db(b, a))


@pytest.mark.parametrize("group", [16, 32])
def test_op_head_dim_not_a_multiple_of_the_group(group):
    q, k, v = _qkv(d=24, hkv=2)  # 24 = 16 + 8: the last group is partial
    _check_against_sdpa(q, k, v, group=group, is_causal=True, enable_gqa=True)


def test_op_saves_only_fp8_qkv_scales_and_the_mask():
    """(H + 2·Hkv)·B·S·(D + 4·ceil(D/16)) bytes, plus the caller's mask tensor itself (no copy)."""
    q, k, v = _qkv(hkv=2, d=20)
    mask = _mask("bool", q, k)
    out, report = measure_saved_tensors(lambda: fp8_attention(q, k, v, mask, enable_gqa=True))
    b, s, d = 2, 24, 20
    assert report.total_bytes == (4 + 2 * 2) * b * s * (d + 4 * 2) + mask.numel()
    assert {dtype for _, _, dtype, _, _ in report.entries} == {torch.float8_e4m3fn, torch.float32, torch.bool}
    saved = out.grad_fn.saved_tensors
    assert any(t.data_ptr() == mask.data_ptr() for t in saved)  # the mask itself
    _, q_q, q_s, k_q, k_s, v_q, v_s = fp8_attention_with_saved(q, k, v, mask, enable_gqa=True)
    for t, t_q, t_s in ((q, q_q, q_s), (k, k_q, k_s), (v, v_q, v_s)):
        want_q, want_s = quantize_per_group(t.detach(), E4M3, 16)
        assert_bit_equal(t_q, want_q)
        assert_bit_equal(t_s, want_s)


@pytest.mark.skipif(not device().type == "cpu", reason="the Triton interpreter runs on the CPU")
def test_op_triton_quantization_saves_the_same_bits():
    q, k, v = _qkv(b=1, h=2, hkv=1, s=8, d=20)
    torch_saved = fp8_attention_with_saved(q, k, v, is_causal=True, enable_gqa=True, backend="torch")
    triton_saved = fp8_attention_with_saved(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
    for a, b in zip(torch_saved, triton_saved):
        assert_bit_equal(a, b)


@pytest.mark.parametrize("values", ["zeros", "tiny", "huge"])
def test_op_zeros_tiny_and_huge_inputs(values):
    """All-zero q (uniform attention), values around 1e-30 (fp32: groups of subnormal-free tiny scales) and 1e30
    (the scores overflow: NaN rows, as plain SDPA's): forward as SDPA, gradients as SDPA's at the dequantized
    inputs, NaN where they are."""
    q, k, v = _qkv(dtype=torch.float32, d=16)
    with torch.no_grad():
        if values == "zeros":
            q.zero_()
        else:
            for t in (q, k, v):
                t.mul_(1e-30 if values == "tiny" else 1e30)
    _check_against_sdpa(q, k, v, is_causal=True)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_op_a_nan_spreads_as_in_plain_sdpa(where):
    """One NaN in q, k or v at (batch 1, head 2, position 5, channel 3): the output is plain SDPA's (q: NaN in that
    one row of that head; k, v: in at least the rows of that head from position 5 on, which attend to it) and every
    other batch and head stays finite. The gradients have NaN in the rows where plain SDPA's have them and wherever
    plain SDPA's do; where plain SDPA's NaN is the one channel (rows that do not attend to the key: 0 · NaN in the
    matmul), the FP8 copy's covers that channel's 1×16 group."""
    q, k, v = _qkv(d=20)
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[where][1, 2, 5, 3] = float("nan")
    grads, plain = _check_against_sdpa(q, k, v, is_causal=True)
    out = fp8_attention(q, k, v, is_causal=True)
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[1, 2, 5:].all() if where != "q" else nan_rows[1, 2].tolist() == [i == 5 for i in range(24)]
    nan_rows[1, 2] = False
    assert not nan_rows.any()
    for a, b in zip(grads, plain):
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a.any(-1), nan_b.any(-1)) and not (nan_b & ~nan_a).any()
        assert not (nan_a & ~nan_b)[..., 16:].any()  # only inside the first 1×16 group (the NaN's, channel 3)
        assert torch.isfinite(a[0]).all() and torch.isfinite(a[:, :2]).all()


def test_op_rejects_what_it_cannot_differentiate():
    q, k, v = _qkv(hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        fp8_attention(q, k, v)
    mask = torch.zeros(1, 1, 24, 24, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient for attn_mask"):
        fp8_attention(q, k, v, mask, enable_gqa=True)
    with pytest.raises(ValueError, match="4-D"):
        fp8_attention(q[0], k[0], v[0])
