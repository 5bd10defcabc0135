"""fp8coat.convert on tiny HF models: names and checkpoints unchanged, eval() untouched, training works, compile."""

from __future__ import annotations

import copy

import pytest
import torch

import fp8coat
from fp8coat.conversion import conversion_summary, unconvert

transformers = pytest.importorskip("transformers")

DECODERS = ["llama", "mistral", "qwen2", "qwen3"]


def tiny_decoder(kind: str, seed: int = 0, **overrides):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    common.update(overrides)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    cfg = cls[0](**common)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls[1](cfg)


def _ids(seed=0, batch=2, seq=24, vocab=128):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("recipe", ["fp8-linear", "coat"])
def test_decoder_conversion_keeps_names_eval_and_trains(kind, recipe):
    base = tiny_decoder(kind).bfloat16()
    model = fp8coat.convert(copy.deepcopy(base), recipe)
    assert list(model.state_dict()) == list(base.state_dict())
    counts = conversion_summary(model)
    n_layers = 2
    assert counts["FP8LinearMixin"] == 7 * n_layers  # q k v o gate up down; lm_head stays BF16
    if recipe == "coat":
        assert counts["FP8GatedMLPMixin"] == n_layers
        assert counts["FP8RMSNormMixin"] == n_layers * (4 if kind == "qwen3" else 2)  # + q_norm, k_norm
    else:
        assert "FP8RMSNormMixin" not in counts
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.norm) is type(base.model.norm)
    ids = _ids()
    base.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, model(input_ids=ids).logits)  # eval is unquantized
    base.train(), model.train()
    loss_b = base(input_ids=ids, labels=ids).loss
    loss_m = model(input_ids=ids, labels=ids).loss
    assert abs(loss_m.item() - loss_b.item()) < 0.02 * loss_b.item()
    loss_m.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert str(fp8coat.get_recipe(recipe)) in repr(model) or "fp8=e4m3/e5m2" in repr(model)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = fp8coat.convert(tiny_decoder("llama").bfloat16(), "coat")
    model.train()
    opt = fp8coat.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    loaded = fp8coat.convert(loaded, "coat")
    again = fp8coat.convert(transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16), "coat")
    plain.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=_ids(1)).logits, loaded(input_ids=_ids(1)).logits)
    loaded.train(), again.train()
    with torch.no_grad():  # training-mode FP8 forward is deterministic given the same weights
        assert torch.equal(loaded(input_ids=_ids(2)).logits, again(input_ids=_ids(2)).logits)


def test_unconvert_and_double_convert():
    model = fp8coat.convert(tiny_decoder("llama"), "coat")
    with pytest.raises(ValueError, match="already converted"):
        fp8coat.convert(model, "coat")
    unconvert(model)
    assert conversion_summary(model) == {}
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    with pytest.raises(ValueError, match="unknown recipe"):
        fp8coat.convert(model, "fp4")


def test_generic_fallback_gpt2_and_vit():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2,
                                                                 n_head=4))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=5))
    cases = [(gpt2, lambda m: m(input_ids=_ids(seq=16), labels=_ids(seq=16)).loss, {"FP8LinearMixin": 8}),
             (vit, lambda m: m(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                               labels=torch.tensor([1, 3])).loss, {"FP8LinearMixin": 12})]
    for base, loss_fn, expect in cases:
        torch.manual_seed(0)
        model = fp8coat.convert(copy.deepcopy(base), "coat")
        counts = conversion_summary(model)
        assert counts["FP8LinearMixin"] == expect["FP8LinearMixin"], counts
        assert counts.get("FP8LayerNormMixin") == 4 and counts.get("FP8ActivationMixin") == 2, counts
        base.eval(), model.eval()
        with torch.no_grad():
            assert torch.allclose(loss_fn(base), loss_fn(model))
        base.train(), model.train()
        torch.manual_seed(1)
        lb = loss_fn(base)
        torch.manual_seed(1)
        lm = loss_fn(model)
        assert abs(lm.item() - lb.item()) < 0.05 * lb.item()
        lm.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_torch_compile_of_converted_model_runs():
    model = fp8coat.convert(tiny_decoder("llama").bfloat16(), "coat")
    model.train()
    ref = copy.deepcopy(model)
    loss_e = ref(input_ids=_ids(), labels=_ids()).loss
    loss_c = torch.compile(model)(input_ids=_ids(), labels=_ids()).loss
    loss_c.backward()
    assert abs(loss_c.item() - loss_e.item()) < 0.01 * loss_e.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp8_gemm_capability_check(monkeypatch):
    from fp8coat import conversion as convert_module

    class FakeParam:
        is_cuda = True
        device = torch.device("cuda", 0)

    model = tiny_decoder("llama")
    monkeypatch.setattr(convert_module, "fp8_gemm_supported", lambda device: False)
    monkeypatch.setattr(torch.nn.Module, "parameters", lambda self, recurse=True: iter([FakeParam()]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="emulate=True"):
        convert_module.convert(model, "coat")


def test_handoffs_are_listed_and_survive_copies():
    """Each pre-norm block links its two FP8 RMSNorms to their consumers; copies keep each link shared by both
    ends (one object), separate from the original's."""
    import pickle

    from fp8coat.nn.handoff import describe_handoffs

    model = fp8coat.convert(tiny_decoder("llama"), "coat").train()
    assert describe_handoffs(model) == [
        f"model.layers.{i}: {norm} -> {consumer}" for i in range(2)
        for norm, consumer in (("input_layernorm", "self_attn.q_proj/k_proj/v_proj"),
                               ("post_attention_layernorm", "mlp"))]
    assert "hands its FP8 input to mlp" in repr(model.model.layers[0].post_attention_layernorm)
    assert describe_handoffs(fp8coat.convert(tiny_decoder("llama"), "fp8-linear")) == []
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer, original = copied.model.layers[0], model.model.layers[0]
        assert layer.input_layernorm._fp8coat_handoff is layer.self_attn.q_proj._fp8coat_share.handoff
        assert layer.post_attention_layernorm._fp8coat_handoff is layer.mlp._fp8coat_handoff
        assert layer.mlp._fp8coat_handoff is not original.mlp._fp8coat_handoff
        out = copied(input_ids=_ids(), labels=_ids())
        torch.testing.assert_close(out.loss, model(input_ids=_ids(), labels=_ids()).loss, rtol=0, atol=0)


def test_linear_inputs_take_their_scale_from_the_producer(monkeypatch):
    """In a coat Llama block only o_proj's input (the attention output) is read for its per-tensor scale: q/k/v and
    gate/up take it from the amax their FP8 norm offered, down from the SwiGLU op's. In backward the gate/up
    gradients' joint scale comes from the amax the SwiGLU backward returns through the link, so only the q/k/v
    gradients are read for a joint scale (o and down: one gradient each). Same loss and gradients, bit for bit, as
    with the amax pass over every input and gradient (the handed-off amax is the same number)."""
    from fp8coat.ops import linear as linear_op

    base = tiny_decoder("llama").bfloat16()
    model = fp8coat.convert(copy.deepcopy(base), "coat").train()
    calls, joint_calls = [], []
    real, real_joint = linear_op.tensor_scale, linear_op.joint_tensor_scale
    monkeypatch.setattr(linear_op, "tensor_scale", lambda x, fmt: calls.append(x.shape) or real(x, fmt))
    monkeypatch.setattr(linear_op, "joint_tensor_scale",
                        lambda xs, fmt: joint_calls.append(len(xs)) or real_joint(xs, fmt))
    loss = model(input_ids=_ids(), labels=_ids()).loss
    assert len(calls) == 2  # one o_proj per layer
    loss.backward()
    assert joint_calls == [3, 3]  # q/k/v per layer; not gate/up
    grads = [p.grad.clone() for p in model.parameters()]

    def no_handoffs(x, *args, x_amax=None, grad_amax_link=False, **kwargs):
        outs = real_linears(x, *args, **kwargs)
        return outs + [None] if grad_amax_link else outs  # a None link: the SwiGLU op returns no amax

    real_linears = linear_op.linears
    monkeypatch.setattr("fp8coat.nn.linear.linears", no_handoffs)
    monkeypatch.setattr("fp8coat.ops.linear.linears", no_handoffs)
    again = fp8coat.convert(copy.deepcopy(base), "coat").train()
    calls.clear()
    joint_calls.clear()
    loss_again = again(input_ids=_ids(), labels=_ids()).loss
    assert len(calls) == 2 * 4  # q/k/v, o, gate/up, down per layer
    loss_again.backward()
    assert sorted(joint_calls) == [2, 2, 3, 3]
    assert torch.equal(loss, loss_again)
    for g, p in zip(grads, again.parameters()):
        assert torch.equal(g, p.grad)


def test_default_conversion_holds_no_fp8_weight_copies():
    """By default the converted linears quantize their weights in every forward and hold nothing: 0 bytes after a
    training step (with ``cache_fp8_weights=True``: 1 byte per weight, below)."""
    from fp8coat.conversion import weight_caches

    assert fp8coat.get_recipe("coat").cache_fp8_weights is False
    model = fp8coat.convert(tiny_decoder("llama"), "coat").train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    model(input_ids=_ids(), labels=_ids())  # a second micro-batch
    assert len(weight_caches(model)) == 14 and sum(c.nbytes for c in weight_caches(model)) == 0


def test_weight_caches_lists_each_converted_linear_once():
    from fp8coat.conversion import weight_caches

    model = fp8coat.convert(tiny_decoder("llama"), fp8coat.get_recipe("coat").with_options(cache_fp8_weights=True))
    model.train()
    caches = weight_caches(model)
    assert len(caches) == conversion_summary(model)["FP8LinearMixin"] == 14 and len(set(map(id, caches))) == 14
    assert sum(c.nbytes for c in caches) == 0  # allocated by the first training forward
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    linears = [m for m in model.modules() if hasattr(m, "_fp8coat_cache")]
    assert sum(c.nbytes for c in caches) == sum(m.weight.numel() + 20 for m in linears)  # 1 byte per weight
    for c in caches:
        c.release()
    assert sum(c.nbytes for c in caches) == 0
    assert weight_caches(fp8coat.convert(tiny_decoder("llama"), "bf16")) == []
