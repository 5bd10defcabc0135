"""Converted modules that compute several layers in one op (q/k/v sharing an input, the gated MLP, norms handing
their saved FP8 input to the next linears) must behave like the separate modules: hooks of every module run
before its weight is read, and in-place edits of a norm's output reach the weight gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from helpers import assert_bit_equal

import fp8coat
from fp8coat.nn.linear import FP8LinearMixin

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).bfloat16()


def _ids(seed=0):
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(seed))


def _materialized(model):
    """A freshly converted model holding the pruned weights as plain parameters."""
    sd = {}
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith("weight_mask"):
            continue
        if name.endswith("weight_orig"):
            sd[name.replace("weight_orig", "weight")] = t * state[name.replace("weight_orig", "weight_mask")]
        else:
            sd[name] = t
    ref = _tiny_llama()
    ref.load_state_dict(sd)
    return fp8coat.convert(ref, "coat").train()


@pytest.mark.parametrize("member", ["k_proj", "v_proj"])
def test_pruned_sibling_of_a_shared_input_group_reads_its_pruned_weight(member):
    """``prune`` recomputes ``weight`` in a forward pre-hook: k/v must not be computed by q's call before it ran."""
    model = fp8coat.convert(_tiny_llama(), "coat").train()
    prune.l1_unstructured(getattr(model.model.layers[0].self_attn, member), "weight", amount=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = _ids()
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        assert_bit_equal(out.logits, _materialized(model)(input_ids=ids).logits)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_hooks_of_the_gated_mlp_parts_run_and_take_effect():
    model = fp8coat.convert(_tiny_llama(), "coat").train()
    mlp = model.model.layers[0].mlp
    calls = []
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        part = getattr(mlp, name)
        part.register_forward_pre_hook(lambda m, a, name=name: calls.append(("pre", name)))
        part.register_forward_hook(lambda m, a, o, name=name: calls.append(("post", name)))
    x = torch.randn(2, 8, 64).bfloat16()
    base = mlp(x)
    assert sorted(calls) == sorted((kind, n) for kind in ("pre", "post")
                                   for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    handle = mlp.down_proj.register_forward_hook(lambda m, a, o: o * 2)
    assert_bit_equal(mlp(x), base * 2)
    handle.remove()
    assert_bit_equal(mlp(x), base)


def test_unhooked_gated_mlp_keeps_its_fused_path():
    """Without hooks the gate/up/down GEMMs run inside the module's fused forward: the parts are never called."""
    model = fp8coat.convert(_tiny_llama(), "coat").train()
    mlp = model.model.layers[0].mlp
    called = []
    original = FP8LinearMixin.forward
    try:
        FP8LinearMixin.forward = lambda self, x: called.append(self) or original(self, x)
        mlp(torch.randn(2, 8, 64).bfloat16())
    finally:
        FP8LinearMixin.forward = original
    assert called == []


@pytest.mark.parametrize("recipe", ["fp8-linear", "coat"])
def test_in_place_edit_of_a_norm_output_reaches_the_weight_gradients(recipe):
    """A forward hook scaling a norm's output in place gives the gradients of one returning a new tensor (the
    consumers must not rebuild their input from the norm's saved, unscaled tensors)."""
    def run(in_place):
        model = fp8coat.convert(_tiny_llama(), recipe).train()
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.register_forward_hook((lambda m, a, o: o.mul_(3.0)) if in_place else (lambda m, a, o: o * 3.0))
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    a, b = run(True), run(False)
    assert a.keys() == b.keys()
    for name in a:
        assert_bit_equal(a[name], b[name], name)


def test_shared_input_outputs_are_not_reused_after_the_input_changed_in_place():
    model = fp8coat.convert(_tiny_llama(), "fp8-linear").train()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 8, 64).bfloat16()
    attn.q_proj(x)  # computes q, k and v
    x.mul_(2)
    fresh = fp8coat.convert(fp8coat.unconvert(copy.deepcopy(model)), "fp8-linear").train()
    assert_bit_equal(attn.k_proj(x), fresh.model.layers[0].self_attn.k_proj(x))


@pytest.mark.parametrize("where", ["self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"])
def test_forward_set_on_a_part_instance_is_called(where):
    """Wrappers that replace ``forward`` on the instance (e.g. accelerate's hooks) run for every part."""
    model = fp8coat.convert(_tiny_llama(), "coat").train()
    ids = _ids()
    base = model(input_ids=ids).logits
    part = model.model.layers[0].get_submodule(where)
    inner = part.forward
    calls = []
    part.forward = lambda x: calls.append(1) or inner(x) * 0
    changed = model(input_ids=ids).logits
    assert calls == [1] and not torch.equal(changed, base)
    del part.forward
    assert_bit_equal(model(input_ids=ids).logits, base)


def test_shared_input_group_keeps_nothing_after_its_last_member():
    """After q, k and v ran, the group holds neither their input nor outputs (they would outlive the layer)."""
    model = fp8coat.convert(_tiny_llama(), "coat").train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    for layer in model.model.layers:
        for share in (layer.self_attn.q_proj._fp8coat_share, layer.mlp.gate_proj._fp8coat_share):
            assert share.x is None and all(o is None for o in share.outputs)
        assert layer.input_layernorm._fp8coat_handoff._offer is None
        assert layer.post_attention_layernorm._fp8coat_handoff._offer is None
