"""GPU-only checks at real shapes (run by scripts/gpu_check.sh on the H200; skipped elsewhere).

Triton kernels against the torch reference running on the same GPU: quantization bit-exact; the fused AdamW step
bit-exact without expansion and within one FP8 code step with expansion (log2/exp2 differ in the last bit).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import adversarial, assert_bit_equal, finite_random

import fp8coat
from fp8coat.formats import E4M3, E5M2
from fp8coat.optim.layout import StateLayout, init_state
from fp8coat.optim.step_reference import StepScalars, adamw_step_reference
from fp8coat.quantization import quantize_per_group, quantize_per_tensor, tensor_amax

pytestmark = pytest.mark.gpu

REAL_SHAPES = [(8192, 4096), (4096, 11008), (2, 2048, 4096), (4097, 1000)]


@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_quantization_bit_exact_at_real_shapes(shape, fmt):
    for x in (finite_random(shape, torch.bfloat16, seed=1, device="cuda"), adversarial(shape, seed=2, device="cuda")):
        for g in (16, 128):
            qa, sa = quantize_per_group(x, fmt, g, backend="torch")
            qb, sb = quantize_per_group(x, fmt, g, backend="triton")
            assert_bit_equal(qa, qb, f"q G={g}")
            assert_bit_equal(sa, sb, f"scale G={g}")
        assert_bit_equal(tensor_amax(x, backend="torch"), tensor_amax(x, backend="triton"), "amax")
        qa, sa = quantize_per_tensor(x, fmt, backend="torch")
        qb, sb = quantize_per_tensor(x, fmt, backend="triton")
        assert_bit_equal(sa, sb, "per-tensor scale")
        assert_bit_equal(qa, qb, "per-tensor q")


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("master", ["fp32", "bf16-remainder", "bf16-stochastic"])
def test_fused_step_matches_reference_at_real_shapes(expand, master):
    from fp8coat.optim.step_triton import fused_adamw_step

    dtype = torch.float32 if master == "fp32" else torch.bfloat16
    layout = StateLayout(E4M3, E4M3, 128, expand, master)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    pa = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
    pb = [p.clone() for p in pa]
    sa = [init_state(p, layout) for p in pa]
    sb = copy.deepcopy(sa)
    for step in range(1, 4):
        grads = [(torch.randn(s, device="cuda", generator=g) * 1e-3).to(dtype) for s in shapes]
        grads[0][:64] = 0.0
        sc = StepScalars(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        for s in sa + sb:
            s["step"] += 1
        for i, (p, gr, s) in enumerate(zip(pa, grads, sa)):
            adamw_step_reference(p, gr, s, layout, sc, sr_key=77 * step + i)
        fused_adamw_step(pb, grads, sb, layout, sc, seed=77 * step)
        torch.cuda.synchronize()
        for i in range(len(shapes)):
            if not expand:
                assert_bit_equal(pa[i], pb[i], f"param {i} step {step}")
                for key in sa[i]:
                    if key != "step":
                        assert_bit_equal(sa[i][key], sb[i][key], f"{key} {i} step {step}")
            else:
                for key in ("exp_avg", "exp_avg_sq"):
                    ca, cb = sa[i][key].view(torch.uint8).int(), sb[i][key].view(torch.uint8).int()
                    same = (ca == cb).float().mean().item()
                    assert same > 0.999, (key, i, step, same)
                    assert torch.equal(sa[i][key + "_absmax"] > 0, sb[i][key + "_absmax"] > 0)
                diff = (pa[i].float() - pb[i].float()).abs()
                if master == "bf16-stochastic":  # nearly equal fp32 updates may round to neighbouring bf16 values
                    rel = (diff.max() / pa[i].float().abs().max()).item()
                    assert rel <= 2.0**-7, (i, step, rel)  # at most one bf16 step of the largest element
                else:
                    rel = (diff.max() / pa[i].float().abs().max()).item()
                    assert rel < 1e-3, (i, step, rel)


def test_adamw_on_gpu_trains_like_torch_adamw():
    torch.manual_seed(0)
    model_ref = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).cuda()
    model = copy.deepcopy(model_ref)
    o_ref = torch.optim.AdamW(model_ref.parameters(), lr=1e-3, fused=True)
    opt = fp8coat.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(256, 512, device="cuda")
    for _ in range(50):
        for m, o in ((model_ref, o_ref), (model, opt)):
            o.zero_grad()
            (m(x) - x).pow(2).mean().backward()
            o.step()
    with torch.no_grad():
        l_ref = (model_ref(x) - x).pow(2).mean().item()
        l_ours = (model(x) - x).pow(2).mean().item()
    assert abs(l_ours - l_ref) / l_ref < 0.05, (l_ours, l_ref)
    assert opt.state_nbytes() / sum(p.numel() for p in model.parameters()) < 2.2


def test_chunked_loss_under_autocast_with_fp32_inputs():
    """fp32 hidden states and LM head under bf16 autocast (fp32-param training) through several loss chunks: the
    in-place fp32 weight-gradient product (not autocast) must see inputs of one dtype; gradients match the full
    logits path within bf16 rounding."""
    from fp8coat.ops.cross_entropy import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(512, 256, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(1000, 256, device="cuda", generator=g) / 16).requires_grad_()
    y = torch.randint(0, 1000, (512,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        linear_cross_entropy(h, w, y, chunk=128).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = h2 @ w2.t()
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    for a, b in ((h.grad, h2.grad), (w.grad, w2.grad)):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert float((a - b).norm() / b.norm()) < 0.03  # both paths round the logits and their gradient to bf16


def test_fast_launch_picks_the_kernel_the_jit_picks_and_computes_the_same():
    """FastKernel's own specialization key against Triton's: for arguments differing in each thing the JIT
    specializes on (pointer alignment, an int equal to 1, ints divisible by 16 or not, dtype, constexprs), the
    kernel the fast path launches is the object Triton's JIT returns for the same arguments."""
    from fp8coat.quantization import triton_kernels as tk

    kernel = tk._scaled_quant_kernel
    base = finite_random((64, 160), torch.float32, seed=5, device="cuda")
    scale = torch.tensor(0.01, device="cuda")
    cases = [
        (base.to(torch.bfloat16), E4M3), (base.to(torch.bfloat16)[:, 1:], E4M3), (base[:1], E5M2),
        (base[:, :33], E4M3), (base[:17, :48], E5M2), (base.to(torch.bfloat16)[:1, :1], E4M3),
    ]
    for x, fmt in cases:
        x2 = x.reshape(-1, x.shape[-1])
        r, k = x2.shape
        block_r, block_k = tk._tiles(r, k)
        grid = (-(-r // block_r), -(-k // block_k))
        outs = []
        for _ in range(3):  # first launch: the JIT; then the direct path
            q = torch.empty(x2.shape, dtype=fmt.dtype, device="cuda")
            args = (x2, scale, q, scale, r, k, x2.stride(0), x2.stride(1))  # (the flag: unread, CONDITIONAL off)
            kw = dict(FMAX=fmt.max, CONDITIONAL=False, BLOCK_R=block_r, BLOCK_K=block_k)
            kernel[grid](*args, **kw)
            outs.append(q)
        jit_kernel = kernel.fn[grid](*args, **kw)
        assert kernel.cached_kernel(args, kw) is jit_kernel, f"shape {tuple(x.shape)} strides {x.stride()}"
        want = quantize_per_tensor(x, fmt, scale, backend="torch")[0]
        for q in outs:
            assert_bit_equal(want, q, f"{tuple(x.shape)} {fmt.name}")


def test_cuda_graph_of_a_cached_fp8_linear_sees_weight_updates():
    """A captured fwd+bwd of FP8 linears with weight caches, replayed after in-place weight updates, computes
    exactly what eager calls with the updated weights compute: the caches are bypassed while a graph is captured
    (a cached FP8 weight read by the replays would go stale)."""
    from fp8coat.ops.linear import FP8WeightCache, linears

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    ws = [(torch.randn(n, 512, device="cuda", generator=g) / 16).bfloat16() for n in (512, 128)]
    dys = [torch.randn(256, n, device="cuda", dtype=torch.bfloat16, generator=g) for n in (512, 128)]
    caches = [FP8WeightCache(), FP8WeightCache()]

    def step():
        gx, gws = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in ws]  # share w's versions
        ys = linears(gx, gws, caches=caches)
        return [y.detach() for y in ys] + list(torch.autograd.grad(ys, [gx, *gws], dys))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up: the caches hold the current weights' FP8 copies
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        static = step()
    for update in range(3):
        with torch.no_grad():
            for w in ws:
                w.mul_(-1.5).add_(0.01 * (update + 1))  # in place, as an optimizer step
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b in zip(static, eager):
            assert_bit_equal(b, a, f"update {update}")


@pytest.mark.parametrize("field", ["fast_accum", "emulate"])
def test_gemm_recipe_fields_change_the_cuda_gemms(field):
    """``fast_accum`` (forward GEMM accumulation) and ``emulate`` (fp32 emulation instead of ``_scaled_mm``) change
    the output bits of a converted layer at a real shape; the difference stays within FP8 accuracy."""
    from fp8coat.nn.linear import fp8_linear_kwargs

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(4096, 4096, device="cuda", generator=g) / 64).bfloat16()
    base = fp8coat.get_recipe("coat")
    changed = base.with_options(**{field: not getattr(base, field)})
    from fp8coat.ops.linear import linear

    y0, y1 = (linear(x, w, **fp8_linear_kwargs(r)) for r in (base, changed))
    assert not torch.equal(y0, y1)
    rel = (y0.float() - y1.float()).norm() / y0.float().norm()
    assert rel < 1e-2
