"""Fused multi-tensor AdamW step with FP8 moments and dynamic range expansion — Triton.

One launch updates every tensor of a bucket (same :class:`StateLayout`, dtypes and hyper-parameters). Each
program owns ``BLOCK_GROUPS`` consecutive 1×G groups of one tensor and does, in registers:

    decode m, v (FP8 + per-group absmax/exponent)  ->  AdamW in fp32  ->  write the parameter
    -> per-group max and min-non-zero of the new m, v  ->  exponent k  ->  encode and write m, v + side data

so each byte of state, gradient and parameter is read once and written once. Elements with a NaN or ±inf
gradient keep their parameter and moments (selects, no extra memory traffic); a program that saw any adds their
number to a device counter with one atomic. Tensors that record their amax (``record_amax``: e.g. weights
gathered in FP8, whose per-tensor scale it gives) reduce the absolute values of the parameter they write over the
tile and fold the result into a per-tensor slot with one atomic max. m and v are clamped to the bounds of
``step_reference.py``. Tensors are found through two small device tables (addresses and shapes) and a
per-program index of the tensor each program works on. Hyper-parameters are fp32 arguments (a
device ``lr`` tensor is read in-kernel), so steps never recompile and never sync with the host. Without expansion
the arithmetic mirrors ``step_reference.py`` operation by operation (FMA contraction disabled): bit-identical.
With expansion (the default) the kernel uses the hardware's approximate log2/exp2, sqrt and division and FMA
contraction: within a few ulp of the reference (``exact_math=True`` keeps the exact arithmetic except
log2/exp2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._grid import cdiv
from .._kernel_helpers import (
    abs_nan_to_inf,
    clamp_cast,
    floor_min_scale,
    fold_tile_amax,
    mix32,
    on_gpu,
    recip_rn,
    scale_from_amax_tl,
)
from .._launch import fast_kernel
from .._numerics import f32
from ..formats import E4M3
from . import state_codec as codec
from .layout import StateLayout
from .step_reference import M_BOUND as _M_BOUND_PY
from .step_reference import V_BOUND as _V_BOUND_PY
from .step_reference import StepScalars, step_constants

__all__ = ["POINTER_KINDS", "fused_adamw_step"]

POINTER_KINDS = ("param", "grad", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_expo",
                 "exp_avg_sq_absmax", "exp_avg_sq_expo", "master_remainder")
_KIND = {k: i for i, k in enumerate(POINTER_KINDS)}
_MASTER_CODE = {"fp32": 0, "none": 0, "bf16-remainder": 1, "bf16-stochastic": 2}

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float8_e4m3fn: tl.float8e4nv,
    torch.float8_e5m2: tl.float8e5,
}


M_BOUND = tl.constexpr(_M_BOUND_PY)  # globals used inside kernels must be constexpr
V_BOUND = tl.constexpr(_V_BOUND_PY)
# the expansion exponent's encoding (state_codec): k = k16 · EXPO_UNIT with 1 <= k16 <= MAX_EXPO,
# 1/k = EXPAND_STEPS / k16
EXPAND_STEPS = tl.constexpr(codec.EXPAND_STEPS)
EXPO_UNIT = tl.constexpr(codec.EXPO_UNIT)
MAX_EXPO = tl.constexpr(float(codec.MAX_EXPO))


@triton.jit
def _ptr(table, kind: tl.constexpr, t, NT, DT: tl.constexpr):
    # the launcher checks that every address is 16-byte aligned: the hint lets loads and stores vectorize
    return tl.multiple_of(tl.load(table + kind * NT + t).to(tl.pointer_type(DT)), 16)


@triton.jit
def _random16(key, offs):
    """16 pseudo-random bits per element: ``mix32(offs ^ mix32(key)) & 0xFFFF`` (torch twin:
    ``master_weights.random16``), a few integer operations instead of a Philox generator."""
    return mix32(offs.to(tl.uint32) ^ mix32(key.to(tl.uint32))) & 0xFFFF


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 in fp32: the MUFU approximation (lg2.approx.ftz: ~2^-22 abs. error, subnormals -> -inf) on GPU;
    tl.log2 elsewhere (the interpreter, which cannot run inline PTX)."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """exp2 in fp32: the MUFU approximation (ex2.approx.ftz: ~2 ulp, subnormal results -> 0) on GPU;
    tl.exp2 elsewhere."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _decode(q_ptr, offs, mask, amax_ptr, expo_ptr, gidx, gmask,
            FP8: tl.constexpr, EXPAND: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr, FAST: tl.constexpr):
    if FP8:
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.load(amax_ptr + gidx, mask=gmask, other=0.0)
        if EXPAND:
            k16 = tl.load(expo_ptr + gidx, mask=gmask, other=EXPAND_STEPS).to(tl.float32)
            inv_k = tl.div_rn(tl.full(k16.shape, EXPAND_STEPS, tl.float32), k16)
            amax = floor_min_scale(amax)
            if FAST:
                # M·(|q|/fmax)^(1/k) = exp2(log2|q| / k + (log2 M - log2(fmax) / k)): one MUFU pair, one FMA
                bias = _log2(amax, FAST) - _log2(tl.full(amax.shape, FMAX, tl.float32), FAST) * inv_k
                mag = _exp2(_log2(tl.abs(q), FAST) * inv_k[:, None] + bias[:, None], FAST)
            else:
                mag = _exp2(_log2(tl.abs(q) * INV_FMAX, FAST) * inv_k[:, None], FAST) * amax[:, None]
            x = tl.where(q < 0, -mag, mag)
        else:
            x = q * scale_from_amax_tl(amax, FMAX)[:, None]
    else:
        x = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _encode_store(x, q_ptr, offs, mask, amax_ptr, expo_ptr, gidx, gmask,
                  FP8: tl.constexpr, EXPAND: tl.constexpr, FMAX: tl.constexpr, C: tl.constexpr, FAST: tl.constexpr):
    if FP8:
        a = abs_nan_to_inf(x)
        amax = tl.max(a, axis=1)
        if EXPAND:
            amin = tl.min(tl.where(a > 0, a, float("inf")), axis=1)
            log_range = _log2(amax, FAST) - _log2(amin, FAST)
            log_range = tl.where(log_range > 0, log_range, 0.0)
            k16 = tl.floor(tl.div_rn(tl.full(log_range.shape, C, tl.float32), log_range))
            k16 = tl.where(k16 > MAX_EXPO, MAX_EXPO, k16)
            k16 = tl.where(k16 < 1.0, 1.0, k16)
            floored = floor_min_scale(amax)
            k = k16 * EXPO_UNIT
            if FAST:
                # fmax·(|x|/M)^k = exp2(k·log2|x| + (log2 fmax - k·log2 M)); the satfinite cast clamps at fmax
                bias = _log2(tl.full(amax.shape, FMAX, tl.float32), FAST) - k * _log2(floored, FAST)
                y = _exp2(k[:, None] * _log2(a, FAST) + bias[:, None], FAST)
            else:
                r = a * recip_rn(floored)[:, None]
                y = FMAX * _exp2(k[:, None] * _log2(r, FAST), FAST)
                y = tl.where(y > FMAX, FMAX, y)
            q = tl.where(x < 0, -y, y).to(q_ptr.dtype.element_ty)
            tl.store(expo_ptr + gidx, k16.to(tl.uint8), mask=gmask)
        else:
            q = clamp_cast(x * recip_rn(scale_from_amax_tl(amax, FMAX))[:, None], FMAX, q_ptr.dtype.element_ty)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(amax_ptr + gidx, amax, mask=gmask)
    else:
        tl.store(q_ptr + offs, x, mask=mask)


@triton.jit
def _record_amax(x, mask, amax_ptr, meta, NT, t):
    """If tensor ``t`` records its amax: the max of ``|x|`` over the tile's elements (NaN counts as +inf, as in
    ``quantization.tensor_amax``) into its int32 slot (``fold_tile_amax``)."""
    if tl.load(meta + 4 * NT + t) != 0:
        fold_tile_amax(x, mask, amax_ptr + t)


@fast_kernel
@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not select another compiled variant
def _adamw_step_kernel(
    table, meta, prog_tensor, NT, lr_ptr, lr_value, seed, count_ptr, amax_ptr,
    one_minus_beta1, beta1, beta2, one_minus_beta2, eps, weight_decay, bias_correction1, inv_bc2_sqrt,
    P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
    M_FP8: tl.constexpr, V_FP8: tl.constexpr, EXPAND: tl.constexpr,
    M_FMAX: tl.constexpr, V_FMAX: tl.constexpr, M_C: tl.constexpr, V_C: tl.constexpr,
    MASTER: tl.constexpr, LR_FROM_PTR: tl.constexpr, MAXIMIZE: tl.constexpr, LERP_SMALL: tl.constexpr,
    G: tl.constexpr, BLOCK_GROUPS: tl.constexpr, FLAT: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
    COUNT: tl.constexpr, AMAX: tl.constexpr,
):
    # table: int64 (9, NT) addresses by POINTER_KINDS; meta: int64 (5, NT) = K, groups, groups/row, first program,
    # records amax (0/1); prog_tensor: int32 (programs,) the tensor each program works on; count_ptr: int64 (), the
    # number of non-finite gradient elements (COUNT); amax_ptr: int32 (NT,) the bit patterns of the new parameters'
    # per-tensor amax (AMAX: some tensor of the launch records it)
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(prog_tensor + pid).to(tl.int64)
    K = tl.load(meta + t)
    n_groups = tl.load(meta + NT + t)
    groups_per_row = tl.load(meta + 2 * NT + t)
    first = tl.load(meta + 3 * NT + t)

    local = pid - first
    gidx = local * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    gmask = gidx < n_groups
    if FLAT:  # every row length is a multiple of G: the program's groups are one contiguous run of elements
        base = tl.multiple_of(local * (BLOCK_GROUPS * G), BLOCK_GROUPS * G)
        offs = base + tl.arange(0, BLOCK_GROUPS)[:, None] * G + tl.arange(0, G)[None, :]
        mask = gmask[:, None]
    else:
        row = gidx // groups_per_row
        col = gidx - row * groups_per_row
        kk = col[:, None] * G + tl.arange(0, G)[None, :]
        mask = gmask[:, None] & (kk < K)
        offs = row[:, None] * K + kk

    g_ptr = _ptr(table, 1, t, NT, G_DT)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    ok = tl.abs(g) < float("inf")  # NaN and ±inf gradient elements leave parameter and moments as they are
    p_ptr = _ptr(table, 0, t, NT, P_DT)
    if MASTER == 1:
        r_ptr = _ptr(table, 8, t, NT, tl.int16)
        par16 = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.uint32) & 0xFFFF
        lo16 = tl.load(r_ptr + offs, mask=mask, other=0).to(tl.uint32) & 0xFFFF
        hi16 = (par16 - (lo16 >= 0x8000).to(tl.uint32)) & 0xFFFF
        p = ((hi16 << 16) | lo16).to(tl.float32, bitcast=True)
        # ±0 written over a remainder >= 0x8000 joins to a NaN pattern: the master is then the parameter itself
        p = tl.where(tl.abs(p) < float("inf"), p, (par16 << 16).to(tl.float32, bitcast=True))
    elif MASTER == 2:
        p = ((tl.load(p_ptr + offs, mask=mask, other=0).to(tl.uint32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    m_ptr = _ptr(table, 2, t, NT, M_DT)
    v_ptr = _ptr(table, 3, t, NT, V_DT)
    m_amax_ptr = _ptr(table, 4, t, NT, tl.float32)
    m_expo_ptr = _ptr(table, 5, t, NT, tl.uint8)
    v_amax_ptr = _ptr(table, 6, t, NT, tl.float32)
    v_expo_ptr = _ptr(table, 7, t, NT, tl.uint8)
    m_old = _decode(m_ptr, offs, mask, m_amax_ptr, m_expo_ptr, gidx, gmask, M_FP8, EXPAND, M_FMAX, 1.0 / M_FMAX, FAST)
    v_old = _decode(v_ptr, offs, mask, v_amax_ptr, v_expo_ptr, gidx, gmask, V_FP8, EXPAND, V_FMAX, 1.0 / V_FMAX, FAST)

    if LR_FROM_PTR:
        lr = tl.load(lr_ptr)
    else:
        lr = lr_value
    step_size = lr / bias_correction1 if not IEEE else tl.div_rn(lr, bias_correction1)
    wd_factor = 1.0 - lr * weight_decay

    p_old = p
    p = p * wd_factor
    if LERP_SMALL:
        m = m_old + one_minus_beta1 * (g - m_old)
    else:
        m = g - (g - m_old) * beta1
    v = v_old * beta2 + (one_minus_beta2 * g) * g
    m = tl.where(ok, tl.minimum(tl.maximum(m, -M_BOUND), M_BOUND), m_old)
    v = tl.where(ok, tl.minimum(v, V_BOUND), v_old)
    if IEEE:  # correctly rounded: bit-identical to the torch reference
        denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
        p = p - tl.div_rn(step_size * m, denom)
    else:  # hardware approximations (sqrt.approx, div.full): a few ulp, fewer instructions
        denom = tl.sqrt(v) * inv_bc2_sqrt + eps
        p = p - (step_size * m) / denom
    p = tl.where(ok, p, p_old)
    if COUNT:  # per group: a reduction within the group's row of the tile, an atomic only where one was seen
        n_bad = tl.sum(tl.where(ok, 0, 1), axis=1)
        tl.atomic_add(count_ptr + tl.zeros_like(gidx), n_bad.to(tl.int64), mask=n_bad > 0)

    if MASTER == 1:
        bits = p.to(tl.uint32, bitcast=True)
        lo16 = bits & 0xFFFF
        hi16 = ((bits >> 16) + (lo16 >= 0x8000).to(tl.uint32)) & 0xFFFF
        # a NaN stays a NaN (rounding its payload up would carry into the sign: 0x7FFFFFFF -> -0.0)
        is_nan = p != p
        hi16 = tl.where(is_nan, (bits >> 16) | 0x40, hi16)
        lo16 = tl.where(is_nan, 0, lo16)
        tl.store(p_ptr + offs, hi16.to(tl.int16), mask=mask)
        tl.store(r_ptr + offs, lo16.to(tl.int16), mask=mask)
        stored = (hi16 << 16).to(tl.float32, bitcast=True)  # the bf16 parameter as written (AMAX only)
    elif MASTER == 2:
        rnd = _random16(seed + t, offs)
        pbits = p.to(tl.uint32, bitcast=True)
        bits = tl.where(p != p, (pbits >> 16) | 0x40, (pbits + rnd) >> 16)  # a NaN stays a NaN
        tl.store(p_ptr + offs, bits.to(tl.int16), mask=mask)
        stored = (bits << 16).to(tl.float32, bitcast=True)  # (the low 16 bits of bits, as stored)
    else:
        new_p = p.to(P_DT)
        tl.store(p_ptr + offs, new_p, mask=mask)
        stored = new_p.to(tl.float32)
    if AMAX:
        _record_amax(stored, mask, amax_ptr, meta, NT, t)

    _encode_store(m, m_ptr, offs, mask, m_amax_ptr, m_expo_ptr, gidx, gmask, M_FP8, EXPAND, M_FMAX, M_C, FAST)
    _encode_store(v, v_ptr, offs, mask, v_amax_ptr, v_expo_ptr, gidx, gmask, V_FP8, EXPAND, V_FMAX, V_C, FAST)


# ---------------------------------------------------------------------------------------------------------------
# launcher


def _records_of(records, nt: int) -> "tuple[bool, ...]":
    """``records`` as a tuple of ``nt`` bools (empty: none records)."""
    if not records:
        return (False,) * nt
    if len(records) != nt:
        raise ValueError(f"record_amax has {len(records)} entries for {nt} tensors")
    return tuple(bool(r) for r in records)


def _fmt_args(fmt):
    if fmt is None:  # fp32 moments: the FMAX/C constants are unused
        return False, E4M3.max, 0.0
    return True, fmt.max, codec.expand_constant(fmt)


def _element_view(p: torch.Tensor, state: dict, layout: StateLayout) -> tuple[int, int]:
    """(rows·K = numel, K) as the kernel sees the tensor: FP8 moments group along the last dim; fp32 moments
    are treated as one flat row."""
    shape = state["exp_avg"].shape
    if layout.m_format is None and layout.v_format is None:
        return p.numel(), max(p.numel(), 1)
    return p.numel(), shape[-1]


class _LaunchPlan:
    """Device-side description of one bucket, rebuilt only when its parameters or states move.

    ``table`` (int64, 9 × NT addresses) is uploaded once; each step only the gradient row changes, written into a
    small ring of pinned host buffers and copied asynchronously (a slot is reused only once its previous copy has
    completed, which an event tells without stalling the stream).

    ``records``: per tensor, whether the launch records the amax of its new parameter. Where any does, ``amax``
    holds one int32 slot per tensor (zeroed before each launch, on device) and ``amax_slots[t]`` is slot ``t`` as
    a 0-d fp32 tensor (a view: the next launch overwrites it); else both are None.
    """

    RING = 4

    def __init__(self, params, states, layout: StateLayout, block_groups: int, records: "tuple[bool, ...]" = ()):
        device = params[0].device
        nt = len(params)
        g_size = layout.group_size
        records = _records_of(records, nt)
        meta = [[0] * nt for _ in range(4)] + [[int(r) for r in records]]
        static = [[0] * nt for _ in POINTER_KINDS]
        programs_per_tensor = []
        self.flat = True
        start = 0
        for t, (p, s) in enumerate(zip(params, states)):
            numel, k = _element_view(p, s, layout)
            self.flat = self.flat and k % g_size == 0
            gpr = cdiv(k, g_size)
            n_groups = (numel // k) * gpr if numel else 0
            meta[0][t], meta[1][t], meta[2][t], meta[3][t] = k, n_groups, gpr, start
            n_prog = cdiv(n_groups, block_groups)
            programs_per_tensor.append(n_prog)
            start += n_prog
            static[_KIND["param"]][t] = p.data_ptr()
            for name in POINTER_KINDS[2:]:
                if name in s:
                    static[_KIND[name]][t] = s[name].data_ptr()
        if any(a % 16 for row in static for a in row):
            raise ValueError("fused AdamW step needs 16-byte aligned parameters and states")
        self.key = self.make_key(params, states, block_groups, records)
        self.records = records
        self.amax = self.amax_slots = None
        if any(records):
            self.amax = torch.zeros(nt, dtype=torch.int32, device=device)
            self.amax_slots = list(self.amax.view(torch.float32).unbind(0))
        self.programs = start
        self.nt = nt
        self.device = device
        self.table = torch.tensor(static, dtype=torch.int64).to(device)
        self.meta = torch.tensor(meta, dtype=torch.int64).to(device)
        self.prog_tensor = torch.repeat_interleave(
            torch.arange(nt, dtype=torch.int32), torch.tensor(programs_per_tensor, dtype=torch.int64)
        ).to(device)
        self._ring = []
        self._slot = 0
        if device.type == "cuda":
            self._ring = [(torch.empty(nt, dtype=torch.int64).pin_memory(), torch.cuda.Event())
                          for _ in range(self.RING)]

    @staticmethod
    def make_key(params, states, block_groups: int, records: "tuple[bool, ...]" = ()) -> tuple:
        return (block_groups, _records_of(records, len(params))) + tuple(
            (p.data_ptr(), s["exp_avg"].data_ptr()) for p, s in zip(params, states))

    def set_grads(self, grads: list[torch.Tensor]) -> None:
        addresses = [g.data_ptr() for g in grads]
        if any(a % 16 for a in addresses):
            raise ValueError("fused AdamW step needs 16-byte aligned gradients")
        row = self.table[_KIND["grad"]]
        if not self._ring:
            row.copy_(torch.tensor(addresses, dtype=torch.int64))
            return
        host, done = self._ring[self._slot]
        done.synchronize()  # the copy that last used this slot (RING steps ago) has long finished
        host.numpy()[:] = addresses
        row.copy_(host, non_blocking=True)
        done.record()
        self._slot = (self._slot + 1) % self.RING


def fused_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    layout: StateLayout,
    scalars: StepScalars,
    *,
    seed: int = 0,
    cache: _LaunchPlan | None = None,
    block_groups: int = 8,
    num_warps: int = 4,
    exact_math: bool | None = None,
    nonfinite_count: torch.Tensor | None = None,
    record_amax: "Sequence[bool]" = (),
) -> _LaunchPlan:
    """Update all ``params`` (same device/dtype/layout/step) in one launch. Returns the launch plan to reuse.

    ``nonfinite_count``: an int64 0-d tensor on the parameters' device to which the number of NaN/±inf gradient
    elements (left un-updated) is added; None: not counted.

    ``record_amax``: per tensor (empty: none), whether to record the amax of its new parameter as stored
    (``quantization.tensor_amax`` of the written tensor: bf16 values for bf16 parameters, NaN as +inf, 0 for an
    empty tensor), which the launch computes from the values it writes, in registers. It lands in the returned
    plan's ``amax_slots[t]`` (0-d fp32, on device; no host sync). Only those tensors pay for it (one reduction
    and one atomic per program); launches recording none compile without it.

    ``exact_math``: True = correctly rounded sqrt and division and no FMA contraction, operation by operation
    what the torch reference computes (bit-identical without expansion); False = the hardware's approximate
    sqrt and division and FMA contraction (a few ulp; fewer instructions in an instruction-bound kernel).
    Default (None): exact without expansion (and for fp32 moments, which are never expanded); approximate with
    expansion, whose MUFU log2/exp2 already differ from the reference in the last bit.
    """
    if exact_math is None:  # fp32 moments are never expanded: exact, as without expansion
        exact_math = not (layout.expand and (layout.m_format is not None or layout.v_format is not None))
    plan = cache
    if plan is None or plan.key != _LaunchPlan.make_key(params, states, block_groups, record_amax):
        plan = _LaunchPlan(params, states, layout, block_groups, tuple(record_amax))
    if plan.amax is not None:
        plan.amax.zero_()  # (stream-ordered: no host sync) empty tensors keep 0
    if plan.programs == 0:
        return plan
    plan.set_grads(grads)
    m_fp8, m_fmax, m_c = _fmt_args(layout.m_format)
    v_fp8, v_fmax, v_c = _fmt_args(layout.v_format)
    c = step_constants(scalars)
    lr_is_tensor = isinstance(scalars.lr, torch.Tensor)
    device = plan.device
    lr_tensor = scalars.lr.detach().to(device=device, dtype=torch.float32).reshape(()) if lr_is_tensor else plan.meta
    lr_value = 0.0 if lr_is_tensor else f32(float(scalars.lr))
    p_dtype = tl.int16 if layout.master in ("bf16-remainder", "bf16-stochastic") else _TL_DTYPE[params[0].dtype]
    _adamw_step_kernel[(plan.programs,)](
        plan.table, plan.meta, plan.prog_tensor, plan.nt, lr_tensor, lr_value, seed & 0x7FFFFFFF,
        plan.meta if nonfinite_count is None else nonfinite_count,
        plan.meta if plan.amax is None else plan.amax,
        c["one_minus_beta1"], c["beta1"], c["beta2"], c["one_minus_beta2"], c["eps"], c["weight_decay"],
        c["bias_correction1"], c["inv_bias_correction2_sqrt"],
        P_DT=p_dtype, G_DT=_TL_DTYPE[grads[0].dtype],
        M_DT=_TL_DTYPE[states[0]["exp_avg"].dtype], V_DT=_TL_DTYPE[states[0]["exp_avg_sq"].dtype],
        M_FP8=m_fp8, V_FP8=v_fp8, EXPAND=layout.expand,
        M_FMAX=m_fmax, V_FMAX=v_fmax, M_C=m_c, V_C=v_c,
        MASTER=_MASTER_CODE[layout.master], LR_FROM_PTR=lr_is_tensor, MAXIMIZE=scalars.maximize,
        LERP_SMALL=c["one_minus_beta1"] < 0.5,
        G=layout.group_size, BLOCK_GROUPS=block_groups, FLAT=plan.flat, IEEE=exact_math,
        FAST=on_gpu(device),
        COUNT=nonfinite_count is not None, AMAX=plan.amax is not None,
        num_warps=num_warps, enable_fp_fusion=not exact_math,
    )
    return plan
