"""Every field of :class:`fp8coat.Recipe` changes what a converted model computes (or is rejected when invalid)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import device

import fp8coat
from fp8coat.formats import E4M3, E5M2
from fp8coat.memory import measure_saved_tensors
from fp8coat.ops.linear import fp8_mm, linears
from fp8coat.quantization import quantize_transpose, scale_from_amax, tensor_amax

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).bfloat16().to(device())


def _run(recipe: fp8coat.Recipe):
    """Loss, gradients and bytes saved for backward (by the decoder layers) of one step of a tiny Llama."""
    model = fp8coat.convert(_tiny_llama(), recipe).train()
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1)).to(device())
    loss, report = measure_saved_tensors(lambda: model(input_ids=ids, labels=ids).loss,
                                         modules=list(model.model.layers))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, report.total_bytes, report.weight_copy_bytes


def _differs(a, b) -> bool:
    return (not torch.equal(a[0], b[0]) or any(not torch.equal(a[1][n], b[1][n]) for n in a[1]) or a[2] != b[2]
            or a[3] != b[3])


COAT = fp8coat.get_recipe("coat")
CHANGES = {
    "fp8_linear": dict(fp8_linear=False, fp8_activations=False),
    "fp8_activations": dict(fp8_activations=False),
    "forward_format": dict(forward_format="e5m2", backward_format="e4m3"),
    "backward_format": dict(backward_format="e4m3"),
    "activation_group_size": dict(activation_group_size=32),
    "cache_fp8_weights": dict(cache_fp8_weights=True),
    "fp8_attention": dict(fp8_attention=True),
}


def test_every_recipe_field_is_covered():
    fields = {f.name for f in dataclasses.fields(fp8coat.Recipe)}
    # name: a label; fast_accum and emulate change the CUDA GEMMs only (tests/test_gpu.py)
    assert fields == set(CHANGES) | {"name", "fast_accum", "emulate"}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_each_field_changes_the_computation(field):
    base = _run(COAT)
    changed = _run(COAT.with_options(**CHANGES[field]))
    assert _differs(base, changed), field
    assert _run(COAT)[0].item() == base[0].item()  # deterministic: the difference is the field's


def test_fp8_weight_cache_is_off_by_default():
    assert not fp8coat.Recipe("r", fp8_linear=True, fp8_activations=False).cache_fp8_weights
    assert not any(r.cache_fp8_weights for r in fp8coat.RECIPES.values())


def test_fp8_weight_cache_changes_memory_only():
    """Without the cache (the default) every weight is quantized in each forward: the same loss, gradients and saved
    bytes, bit for bit, and no FP8 copy held (with it: one byte per weight of the converted linears, plus scale and
    record)."""
    cached, fresh = _run(COAT.with_options(cache_fp8_weights=True)), _run(COAT)
    assert torch.equal(cached[0], fresh[0]) and all(torch.equal(cached[1][n], fresh[1][n]) for n in cached[1])
    assert cached[2] == fresh[2]
    model = _tiny_llama()
    linear_weights = [m.weight for layer in model.model.layers for m in layer.modules()
                      if isinstance(m, torch.nn.Linear)]
    assert cached[3] == sum(w.numel() + 4 + 16 for w in linear_weights)
    assert fresh[3] == 0


def test_fp8_attention_changes_gradients_and_saved_bytes_not_the_forward():
    """The attention core's forward is plain SDPA (the same loss, bit for bit); its backward runs from FP8 copies of
    q, k, v (other gradients) and it keeps less."""
    base, fp8 = _run(COAT), _run(COAT.with_options(fp8_attention=True))
    assert torch.equal(base[0], fp8[0])
    assert any(not torch.equal(base[1][n], fp8[1][n]) for n in base[1])
    assert fp8[2] < base[2]
    assert not any(r.fp8_attention for r in fp8coat.RECIPES.values())
    with pytest.raises(ValueError, match="fp8_attention needs fp8_activations"):
        fp8coat.get_recipe("fp8-linear").with_options(fp8_attention=True)


def test_backward_format_changes_gradients_only():
    base, e4m3 = _run(COAT), _run(COAT.with_options(backward_format="e4m3"))
    assert torch.equal(base[0], e4m3[0]) and base[2] == e4m3[2]  # same forward, same saved bytes
    assert any(not torch.equal(base[1][n], e4m3[1][n]) for n in base[1])


@pytest.mark.parametrize("bwd", ["e5m2", "e4m3"])
def test_linear_gradients_are_quantized_in_the_backward_format(bwd):
    """dX and dW from gradients quantized in ``bwd_format``: bit-exact against the computation from primitives."""
    gfmt = {"e5m2": E5M2, "e4m3": E4M3}[bwd]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(48, 64, generator=g) / 8).bfloat16().requires_grad_()
    go = torch.randn(40, 48, generator=g).bfloat16()
    linears(x, [w], emulate=True, bwd_format=bwd)[0].backward(go)
    sx, sw, sg = (scale_from_amax(tensor_amax(t), f) for t, f in ((x, E4M3), (w, E4M3), (go, gfmt)))
    gq, gqt = quantize_transpose(go, gfmt, sg)
    _, wqt = quantize_transpose(w.detach(), E4M3, sw, rowwise=False, pad_to=1)
    _, xqt = quantize_transpose(x.detach(), E4M3, sx, rowwise=False)
    assert torch.equal(x.grad, fp8_mm(gq, sg, wqt, sw, torch.bfloat16, emulate=True))
    assert torch.equal(w.grad, fp8_mm(gqt, sg, xqt, sx, w.dtype, emulate=True))


def test_two_e5m2_operands_are_rejected():
    with pytest.raises(ValueError, match="both be e5m2"):
        COAT.with_options(forward_format="e5m2")
    with pytest.raises(ValueError, match="unknown FP8 format"):
        COAT.with_options(backward_format="e3m4")


def test_recipe_printed_as_it_runs():
    r = COAT.with_options(backward_format="e4m3")
    assert "E4M3/E4M3" in str(r)
    assert str(COAT) == "coat (E4M3/E5M2 GEMMs, FP8 1x16 activations)"
    assert str(COAT.with_options(cache_fp8_weights=True)) == (
        "coat (E4M3/E5M2 GEMMs, FP8 1x16 activations, FP8 weight copies kept between steps)")
    assert str(COAT.with_options(fp8_attention=True)) == (
        "coat (E4M3/E5M2 GEMMs, FP8 1x16 activations, FP8-saved attention inputs)")
    model = fp8coat.convert(_tiny_llama(), r)
    assert "fp8=e4m3/e4m3" in repr(model.model.layers[0].self_attn.q_proj)
    assert copy.deepcopy(r) == r
