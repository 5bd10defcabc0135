"""Quantization primitives: torch reference vs Triton kernels (bit-exact), and the reference's own semantics."""

from __future__ import annotations

import pytest
import torch
from helpers import adversarial, assert_bit_equal, device, finite_random, sqnr_db

from fp8coat.formats import E4M3, E5M2, cast_to_fp8, get_format
from fp8coat.quantization import (
    dequantize_per_group,
    dequantize_per_tensor,
    quantize_per_group,
    quantize_per_tensor,
    tensor_amax,
)
from fp8coat.quantization import reference as ref

SHAPES = [(7,), (3, 16), (33, 70), (5, 3, 300), (2, 1, 129), (1, 1), (64, 256)]


# ---------------------------------------------------------------------------------------------------------------
# formats


def test_formats_constants_match_torch():
    for fmt in (E4M3, E5M2):
        fi = torch.finfo(fmt.dtype)
        assert fmt.max == fi.max
        assert fmt.min_normal == fi.smallest_normal
    assert E4M3.min_subnormal == 2.0**-9 and E5M2.min_subnormal == 2.0**-16
    assert E4M3.dynamic_range == 229376.0
    assert get_format("E5M2") is E5M2 and get_format(torch.float8_e4m3fn) is E4M3
    with pytest.raises(ValueError, match="unknown FP8 format"):
        get_format("e3m4")
    with pytest.raises(ValueError, match="not an FP8 dtype"):
        get_format(torch.float16)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_cast_to_fp8_clamps_and_keeps_nan(fmt):
    x = torch.tensor([1e10, -1e10, float("inf"), float("-inf"), float("nan"), 0.0, 1.0])
    q = cast_to_fp8(x, fmt).float()
    assert q[0] == fmt.max and q[1] == -fmt.max and q[2] == fmt.max and q[3] == -fmt.max
    assert torch.isnan(q[4]) and q[5] == 0 and q[6] == 1


# ---------------------------------------------------------------------------------------------------------------
# reference semantics


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("group_size", [16, 128])
def test_per_group_reference_semantics(fmt, group_size):
    x = finite_random((9, 300), seed=1)
    x[0, :group_size] = 0.0  # an all-zero group
    q, s = quantize_per_group(x, fmt, group_size, backend="torch")
    assert q.dtype == fmt.dtype and q.shape == x.shape
    assert s.shape == (9, -(-300 // group_size)) and s.dtype == torch.float32
    # the group max maps exactly onto ±fmax; all-zero groups stay zero
    qf = q.float()
    xp = torch.nn.functional.pad(x, (0, (-300) % group_size)).reshape(9, -1, group_size)
    qp = torch.nn.functional.pad(qf, (0, (-300) % group_size)).reshape(9, -1, group_size)
    nonzero = xp.abs().amax(-1) > 0
    assert torch.all(qp.abs().amax(-1)[nonzero] == fmt.max)
    assert torch.all(q[0, :group_size].float() == 0)
    # error bound: half an ulp of the format relative to the group's max (normal range)
    xh = dequantize_per_group(q, s, group_size, backend="torch")
    err = (xh - x).abs()
    bound = (s * fmt.max).repeat_interleave(group_size, -1)[:, :300] * 2.0 ** (-fmt.mantissa_bits)
    assert torch.all(err <= bound)
    assert sqnr_db(x, xh) > (25 if fmt is E4M3 else 19)


def test_non_finite_poisons_its_group_only():
    x = finite_random((2, 64), seed=2)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    q, s = quantize_per_group(x, E4M3, 16, backend="torch")
    xh = dequantize_per_group(q, s, 16, backend="torch")
    assert torch.isinf(s[0, 0]) and torch.isinf(s[1, 2])
    assert torch.isnan(xh[0, :16]).all() and torch.isnan(xh[1, 32:48]).all()
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[0, :16] = False
    finite[1, 32:48] = False
    assert torch.isfinite(xh[finite]).all()


def test_per_tensor_equals_one_group_and_two_stage_amax():
    x = finite_random((33, 70), seed=3)
    q, s = quantize_per_tensor(x, E4M3, backend="torch")
    assert s.dim() == 0
    assert s == ref.scale_from_amax(x.abs().amax(), E4M3)
    # per-tensor scale from the per-group maxima (group scaling) is the same number
    s2 = ref.scale_from_amax(ref.group_amax(x, 16).amax(), E4M3)
    assert torch.equal(s, s2)
    assert sqnr_db(x, dequantize_per_tensor(q, s)) > 10  # wide dynamic range: a per-tensor scale loses small values


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels vs reference (interpreter on CPU, native on GPU)


def _inputs(shape, dtype, seed):
    yield "adversarial", adversarial(shape, seed=seed).to(dtype)
    yield "random", finite_random(shape, seed=seed + 100).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_group_triton_bit_exact(shape, fmt, dtype):
    for group_size in (16, 128):
        for name, x in _inputs(shape, dtype, seed=len(shape) + group_size):
            x = x.to(device())
            qa, sa = quantize_per_group(x, fmt, group_size, backend="torch")
            qb, sb = quantize_per_group(x, fmt, group_size, backend="triton")
            assert_bit_equal(qa, qb, f"{name} q G={group_size}")
            assert_bit_equal(sa, sb, f"{name} scale G={group_size}")
            da = dequantize_per_group(qa, sa, group_size, torch.float32, backend="torch")
            db = dequantize_per_group(qa, sa, group_size, torch.float32, backend="triton")
            assert_bit_equal(da, db, f"{name} dequant G={group_size}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_per_tensor_triton_bit_exact(shape, fmt):
    for name, x in _inputs(shape, torch.bfloat16, seed=7):
        x = x.to(device())
        assert_bit_equal(tensor_amax(x, backend="torch"), tensor_amax(x, backend="triton"), f"{name} amax")
        qa, sa = quantize_per_tensor(x, fmt, backend="torch")
        qb, sb = quantize_per_tensor(x, fmt, backend="triton")
        assert_bit_equal(sa, sb, f"{name} scale")
        assert_bit_equal(qa, qb, f"{name} q")


def test_non_contiguous_and_empty_inputs():
    base = finite_random((40, 96), seed=11).to(device())
    views = {
        "transposed": base.t(),
        "sliced": base[:, 5:77],
        "strided": base[::3, ::2],
        "3d-permuted": base.reshape(4, 10, 96).permute(1, 0, 2),
    }
    for name, x in views.items():
        assert not x.is_contiguous()
        for backend in ("torch", "triton"):
            q, s = quantize_per_group(x, E4M3, 16, backend=backend)
            qc, sc = quantize_per_group(x.contiguous(), E4M3, 16, backend=backend)
            assert_bit_equal(q, qc, f"{name} {backend}")
            assert_bit_equal(s, sc, f"{name} {backend} scale")
            qt, _st = quantize_per_tensor(x, E5M2, backend=backend)
            qtc, _stc = quantize_per_tensor(x.contiguous(), E5M2, backend=backend)
            assert_bit_equal(qt, qtc, f"{name} {backend} per-tensor")
    for shape in [(0,), (0, 16), (3, 0, 32)]:
        x = torch.empty(shape, device=device())
        for backend in ("torch", "triton"):
            q, s = quantize_per_group(x, E4M3, 16, backend=backend)
            assert q.shape == x.shape and s.shape == (*shape[:-1], -(-shape[-1] // 16))
            q, s = quantize_per_tensor(x, E4M3, backend=backend)
            assert q.shape == x.shape and float(s) == ref.MIN_SCALE


def test_bad_arguments():
    x = torch.randn(4, 32)
    for g in (0, 8, 24, 100):
        with pytest.raises(ValueError, match="power of two"):
            quantize_per_group(x, E4M3, g)
    with pytest.raises(ValueError, match="unknown backend"):
        quantize_per_group(x, E4M3, 16, backend="cuda")
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_per_group(torch.tensor(1.0), E4M3, 16)


@pytest.mark.parametrize("shape", [(1, 16), (33, 70), (100, 48), (64, 128), (5, 3)])
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_quantize_transpose_bit_exact(shape, fmt):
    from fp8coat.quantization import quantize_transpose

    for name, x in _inputs(shape, torch.bfloat16, seed=13):
        x = x.to(device())
        s = ref.scale_from_amax(ref.tensor_amax(x), fmt)
        for rowwise in (True, False):
            qa, qta = quantize_transpose(x, fmt, s, rowwise, backend="torch")
            qb, qtb = quantize_transpose(x, fmt, s, rowwise, backend="triton")
            assert qta.shape == (shape[1], -(-shape[0] // 16) * 16)
            assert_bit_equal(qta, qtb, f"{name} qt")
            assert torch.all(qta[:, shape[0]:].float() == 0)
            if rowwise:
                assert_bit_equal(qa, qb, f"{name} q")
                assert_bit_equal(qa.t(), qta[:, : shape[0]], f"{name} q vs qt")
            else:
                assert qa is None and qb is None
    xt = finite_random((48, 40), seed=3).to(device()).t()  # non-contiguous input
    s = ref.scale_from_amax(ref.tensor_amax(xt), E4M3)
    assert_bit_equal(quantize_transpose(xt, E4M3, s, backend="triton")[1],
                     quantize_transpose(xt.contiguous(), E4M3, s, backend="torch")[1], "strided")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_transpose_into_column_blocks_of_one_buffer(dtype):
    """Several tensors written side by side into one (M, ΣN) buffer and one (ΣN, M_pad) buffer (the layout of a
    fused projection's gradient): bit-exact between backends, each block equal to quantizing alone, nothing written
    outside the blocks, the padding columns zero."""
    from fp8coat.quantization import quantize_transpose

    m, ns = 37, (32, 48, 16)
    m_pad, total = 48, sum(ns)
    xs = [finite_random((m, n), seed=40 + n).to(device(), dtype) for n in ns]
    xs[1][3, 5] = float("nan")
    xs[2][:, :] = 0.0
    s = ref.scale_from_amax(torch.stack([ref.tensor_amax(x) for x in xs]).amax(), E5M2)
    outs = {}
    for backend in ("torch", "triton"):
        q = torch.full((m + 2, total + 8), 7.0, device=device()).to(E5M2.dtype)[1:-1, 4:-4]  # poisoned margins
        qt = torch.full((total, m_pad + 8), 7.0, device=device()).to(E5M2.dtype)[:, :m_pad]
        start = 0
        for x, n in zip(xs, ns):
            rq, rqt = quantize_transpose(x, E5M2, s, out=q[:, start:start + n], out_t=qt[start:start + n],
                                         backend=backend)
            assert rq.data_ptr() == q[:, start:].data_ptr() and rqt.data_ptr() == qt[start:].data_ptr()
            alone, alone_t = quantize_transpose(x, E5M2, s, backend="torch")
            assert_bit_equal(q[:, start:start + n], alone, f"{backend} block {n}")
            assert_bit_equal(qt[start:start + n], alone_t, f"{backend} transposed block {n}")
            start += n
        assert torch.all(qt[:, m:].float() == 0)
        base = q._base if q._base is not None else q
        assert torch.all(base[0].float() == 7) and torch.all(base[:, :4].float() == 7)  # untouched margins
        assert torch.all(base[:, -4:].float() == 7) and torch.all(base[-1].float() == 7)
        outs[backend] = (q.clone(), qt.clone())
    assert_bit_equal(outs["torch"][0], outs["triton"][0], "q")
    assert_bit_equal(outs["torch"][1], outs["triton"][1], "qt")
    # a transposed copy without padding (pad_to=1) written as column blocks: how weights are laid side by side
    w = finite_random((24, 40), seed=5).to(device(), dtype)
    sw = ref.scale_from_amax(ref.tensor_amax(w), E4M3)
    wt = torch.zeros((40, 24 + 16), device=device()).to(E4M3.dtype)
    quantize_transpose(w, E4M3, sw, rowwise=False, pad_to=1, out_t=wt[:, 16:], backend="triton")
    assert_bit_equal(wt[:, 16:], quantize_transpose(w, E4M3, sw, rowwise=False, pad_to=1, backend="torch")[1], "wt")
    assert torch.all(wt[:, :16].float() == 0)


def test_quantize_transpose_rejects_wrong_destinations():
    from fp8coat.quantization import quantize_transpose

    x = torch.randn(20, 32, device=device())
    s = ref.scale_from_amax(ref.tensor_amax(x), E4M3)
    good_t = torch.empty(32, 32, dtype=E4M3.dtype, device=device())
    bad = {
        "shape": {"out": torch.empty(20, 16, dtype=E4M3.dtype, device=device())},
        "dtype": {"out": torch.empty(20, 32, dtype=E5M2.dtype, device=device())},
        "strided rows": {"out": torch.empty(32, 20, dtype=E4M3.dtype, device=device()).t()},
        "padding": {"out_t": torch.empty(32, 20, dtype=E4M3.dtype, device=device())},
        "not requested": {"out_t": good_t, "transposed": False},
    }
    for backend in ("torch", "triton"):
        for kwargs in bad.values():
            with pytest.raises(ValueError, match="out"):
                quantize_transpose(x, E4M3, s, backend=backend, **kwargs)
        quantize_transpose(x, E4M3, s, out_t=good_t, backend=backend)


@pytest.mark.parametrize("shapes", [[(33, 70)], [(33, 70), (33, 16), (5, 300)], [(0, 8), (7, 9)], [(0, 4), (3, 0)]])
def test_joint_tensor_scale_is_the_scale_of_the_concatenation(shapes):
    from fp8coat.quantization import joint_tensor_scale, tensor_scale

    for name, x in _inputs((sum(a * b for a, b in shapes) + 1,), torch.bfloat16, seed=len(shapes)):
        parts, start = [], 0
        for a, b in shapes:
            parts.append(x[start:start + a * b].reshape(a, b).to(device()))
            start += a * b
        flat = torch.cat([p.reshape(-1) for p in parts])
        for fmt in (E4M3, E5M2):
            want = tensor_scale(flat, fmt, backend="torch")
            for backend in ("torch", "triton"):
                assert_bit_equal(joint_tensor_scale(parts, fmt, backend=backend), want, f"{name} {backend}")
    # a large value in the LAST tensor of the chain, and in the first: both must reach the scale
    a, b = torch.ones(40, 64, device=device()), torch.ones(40, 64, device=device())
    b[3, 7] = 448.0 * 4
    for backend in ("torch", "triton"):
        assert float(joint_tensor_scale([a, b], E4M3, backend=backend)) == 4.0
        assert float(joint_tensor_scale([b, a], E4M3, backend=backend)) == 4.0
    with pytest.raises(ValueError, match="at least one"):
        joint_tensor_scale([], E4M3)


@pytest.mark.parametrize("shape", [(0, 8), (7,), (33, 70), (300, 1000)])
def test_tensor_scale_one_pass_matches_reference(shape):
    from fp8coat.quantization import tensor_scale

    for name, x in _inputs(shape, torch.bfloat16, seed=21):
        x = x.to(device())
        for fmt in (E4M3, E5M2):
            assert_bit_equal(tensor_scale(x, fmt, backend="torch"), tensor_scale(x, fmt, backend="triton"), name)


@pytest.mark.parametrize("max_programs", [1, 3, 7])
def test_amax_programs_loop_over_tiles_and_leave_the_counter_at_zero(max_programs, monkeypatch):
    """Fewer programs than tiles: each folds several tiles. One scratch pair reused by every launch (as on a CUDA
    stream): each launch must leave its counter at 0 for the next."""
    from fp8coat.quantization import triton_kernels as tk

    scratch = tk._amax_scratch(device())
    monkeypatch.setattr(tk, "_amax_scratch", lambda dev: scratch)
    for name, x in _inputs((300, 1000), torch.bfloat16, seed=31 + max_programs):
        x = x.to(device())[:, 3:997]  # strided rows, tiles with ragged edges
        for fmt in (None, E4M3, E5M2):
            out = torch.empty((), dtype=torch.float32, device=device())
            tk._launch_amax(x, out, fmt, max_programs=max_programs)
            want = ref.tensor_amax(x) if fmt is None else ref.scale_from_amax(ref.tensor_amax(x), fmt)
            assert_bit_equal(want, out, f"{name} {fmt} programs={max_programs}")
            assert scratch[1].item() == 0
