"""FP8-saved attention inputs (``Recipe.fp8_attention``): the op ``fp8coat.ops.attention.fp8_attention`` against
torch's SDPA, and its routing through transformers' attention interface in converted models.

The op's oracle: its forward is plain SDPA on the original q, k, v (bit for bit); its gradients are autograd's
through SDPA at the dequantized q, k, v (bit for bit: the same SDPA backward on the same tensors); against the
gradients of plain SDPA at the original inputs they keep an SQNR of at least 22 dB (bf16; measured 24-34 dB).
Converted models: the training forward and the eval forward are the unconverted ones bit for bit, training tracks
plain ``coat`` (every loss of 6 AdamW steps within 0.5%), ``unconvert`` restores ``"sdpa"``, and a saved checkpoint
loads without fp8coat's registration.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import vlm_models as V
from helpers import assert_bit_equal, device, sqnr_db

import fp8coat
from fp8coat.conversion import conversion_summary
from fp8coat.formats import E4M3
from fp8coat.memory import measure_saved_tensors
from fp8coat.nn.attention import ATTENTION_NAME, FP8AttentionMixin, compact_views
from fp8coat.ops.attention import fp8_attention, fp8_attention_with_saved
from fp8coat.quantization import dequantize_per_group, quantize_per_group

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FP8_ATTENTION = fp8coat.get_recipe("coat").with_options(fp8_attention=True)


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


# ---------------------------------------------------------------------------------------------------------------
# converted models


def _tiny_llama(attn: str = "sdpa", dropout: float = 0.0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False, attention_dropout=dropout)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).bfloat16()


IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))


def test_llama_conversion_keys_eval_training_forward_and_unconvert():
    base = _tiny_llama()
    coat = fp8coat.convert(copy.deepcopy(base), "coat")
    model = fp8coat.convert(copy.deepcopy(base), FP8_ATTENTION)
    assert list(model.state_dict()) == list(base.state_dict())
    assert conversion_summary(model) == {**conversion_summary(coat), "FP8AttentionMixin": 2}
    assert model.config._attn_implementation == ATTENTION_NAME and base.config._attn_implementation == "sdpa"
    assert "fp8 attention inputs=1x16" in repr(model.model.layers[0].self_attn)
    base.eval(), model.eval()
    with torch.no_grad():
        assert_bit_equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)  # eval: the original forwards
    model.train(), coat.train()
    assert_bit_equal(model(input_ids=IDS, labels=IDS).loss, coat(input_ids=IDS, labels=IDS).loss)  # plain SDPA fwd
    with torch.no_grad():  # no grad: plain SDPA, nothing to save
        assert_bit_equal(model(input_ids=IDS).logits, coat(input_ids=IDS).logits)
    fp8coat.unconvert(model)
    assert model.config._attn_implementation == "sdpa" and conversion_summary(model) == {}
    assert not any(isinstance(m, FP8AttentionMixin) for m in model.modules())


def test_llama_padding_mask_is_sdpa_s():
    """A padded batch: HF builds the mask it builds for SDPA (the name is registered with SDPA's mask function),
    and the training forward equals plain coat's."""
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0
    coat = fp8coat.convert(_tiny_llama(), "coat").train()
    model = fp8coat.convert(_tiny_llama(), FP8_ATTENTION).train()
    a = model(input_ids=IDS, attention_mask=mask).logits
    b = coat(input_ids=IDS, attention_mask=mask).logits
    assert_bit_equal(a, b)
    a.float().sum().backward()


def _train(model, inputs, steps=6):
    opt = fp8coat.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "llava-clip", "qwen2-vl"])
def test_training_tracks_plain_coat(family):
    """6 steps of fp8coat.AdamW (lr 1e-3) on one batch: the first loss equal to plain coat's, every other within
    0.5% of it, and the model learns."""
    if family == "llama":
        base, inputs = _tiny_llama(), dict(input_ids=IDS, labels=IDS)
    else:
        base, inputs = V.build(family).bfloat16(), V.inputs(family, dtype=torch.bfloat16)
    coat = _train(fp8coat.convert(copy.deepcopy(base), "coat").train(), inputs)
    fp8 = _train(fp8coat.convert(copy.deepcopy(base), FP8_ATTENTION).train(), inputs)
    assert fp8[0] == coat[0]
    assert all(abs(a / b - 1) < 0.005 for a, b in zip(fp8, coat)), (fp8, coat)
    assert fp8[-1] < 0.9 * fp8[0]


@pytest.mark.parametrize("family", V.FAMILIES)
def test_vlm_conversion_switches_text_and_vision_configs(family):
    base = V.build(family).bfloat16()
    model = fp8coat.convert(copy.deepcopy(base), FP8_ATTENTION)
    cfg = model.config
    assert (cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation) == (ATTENTION_NAME,) * 2
    assert cfg._attn_implementation == "sdpa"  # the top config is read by no attention module
    attention = [m for m in model.modules() if isinstance(m, FP8AttentionMixin)]
    assert len(attention) == 4  # 2 vision blocks, 2 decoder layers
    inputs = V.inputs(family, seed=3, dtype=torch.bfloat16)
    base.eval(), model.eval()
    with torch.no_grad():
        assert_bit_equal(model(**inputs).logits, base(**inputs).logits)
    model.train()
    model(**inputs).loss.backward()
    fp8coat.unconvert(model)
    assert (cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation) == ("sdpa", "sdpa")


def test_qwen2_vl_vision_attention_saves_one_fp8_copy_per_image():
    """Qwen2-VL's vision attention calls the interface once per image (its cu_seqlens chunks): 2 images × 2 blocks
    × q, k, v, each (1, 4, 16, 16) E4M3 with (1, 4, 16, 1) scales."""
    model = fp8coat.convert(V.build("qwen2-vl").bfloat16(), FP8_ATTENTION).train()
    inputs = V.inputs("qwen2-vl", dtype=torch.bfloat16)
    _, report = measure_saved_tensors(lambda: model(**inputs).loss, modules=model)
    fp8 = [(module, shape) for _, module, dtype, shape, _ in report.entries
           if dtype == torch.float8_e4m3fn and module.endswith(".attn")]
    assert sorted(fp8) == sorted([(f"model.visual.blocks.{b}.attn", (1, 4, 16, 16)) for b in (0, 1)] * 6)


def test_compact_views_copies_only_views_of_larger_storages():
    fused = torch.randn(2, 6, 6, dtype=torch.bfloat16)  # a fused q/k/v output: (B, S, 3·D), D = 2
    q, k, v = fused[..., 0:2], fused[..., 2:4], fused[..., 4:6]
    same = compact_views([q, k, v])  # the three fill the storage together (GPT-2): no copy
    assert all(a is b for a, b in zip(same, (q, k, v)))
    rope_q, rope_k = q * 2, k * 2  # q and k replaced by new tensors (RoPE): v alone keeps the fused storage
    out = compact_views([rope_q, rope_k, v])
    assert out[0] is rope_q and out[1] is rope_k and out[2] is not v
    assert torch.equal(out[2], v) and out[2].is_contiguous()
    assert out[2].untyped_storage().nbytes() == v.numel() * v.element_size()


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_coat_hands_sdpa_a_compact_v_in_fused_qkv_vision_attention(family):
    """coat converts the vision attention modules with a fused qkv projection (the LM's and LLaVA's separate q/k/v
    stay plain SDPA): their SDPA gets a compact copy of v, so the fused output is not kept — same loss and gradients
    bit for bit, 4 bytes per token and channel less."""
    base = V.build(family).bfloat16()
    model = fp8coat.convert(copy.deepcopy(base), "coat").train()
    assert conversion_summary(V.vision_tower(model))["FP8AttentionMixin"] == 2
    assert model.config.vision_config._attn_implementation == ATTENTION_NAME
    assert model.config.text_config._attn_implementation == "sdpa"
    plain = copy.deepcopy(model)
    plain.config.vision_config._attn_implementation_internal = "sdpa"  # the same model, SDPA on the views
    inputs = V.inputs(family, dtype=torch.bfloat16)
    losses, grads, vision = [], [], []
    for m in (model, plain):
        loss, report = measure_saved_tensors(lambda m=m: m(**inputs).loss, modules=m)
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
        vision.append(sum(b for fqn, b in report.by_module.items() if fqn.startswith("model.visual.blocks")))
    assert_bit_equal(losses[0], losses[1])
    for a, b in zip(*grads):
        assert_bit_equal(a, b)
    tokens, width = V.IMAGES_PER_LLAVA * 2, 64
    assert vision[1] - vision[0] == 2 * 4 * tokens * width  # 2 blocks: the q and k parts of the fused output


def test_module_filter_selects_which_configs_switch():
    """Converting the vision tower only switches the vision config; the LM's attention stays plain SDPA."""
    model = V.build("llava-clip").bfloat16()
    fp8coat.convert(model, FP8_ATTENTION, module_filter_fn=lambda m, fqn: fqn.startswith("model.vision_tower.")
                    and ".layers." in fqn)
    assert model.config.vision_config._attn_implementation == ATTENTION_NAME
    assert model.config.text_config._attn_implementation == "sdpa"
    assert conversion_summary(model)["FP8AttentionMixin"] == 2


def test_other_attention_implementations_are_kept_and_reported():
    model = fp8coat.convert(_tiny_llama("eager"), FP8_ATTENTION)
    summary = conversion_summary(model)
    assert summary["attention kept: eager"] == 2 and "FP8AttentionMixin" not in summary
    assert model.config._attn_implementation == "eager"
    fp8coat.unconvert(model)
    assert conversion_summary(model) == {}


def _saves_fp8_attention_inputs(report) -> bool:
    return any(dtype == torch.float8_e4m3fn and module.endswith("self_attn")
               for _, module, dtype, _, _ in report.entries)


def test_dropout_keeps_plain_sdpa_and_warns():
    """A recompute would draw another dropout mask: with attention dropout in training, SDPA runs as it is, and the
    user who asked for FP8 attention inputs is told."""
    model = fp8coat.convert(_tiny_llama(dropout=0.1), FP8_ATTENTION).train()
    with pytest.warns(UserWarning, match="attention dropout"):
        _, report = measure_saved_tensors(lambda: model(input_ids=IDS, labels=IDS).loss, modules=model)
    assert not _saves_fp8_attention_inputs(report)


def test_under_autocast_the_attention_saves_fp8_inputs_of_the_autocast_dtype():
    """fp32 parameters under bf16 autocast (the trainer's fp32 masters): SDPA's inputs are cast to bf16 as autocast
    casts them, so the forward equals plain coat's under autocast bit for bit and q, k, v are still saved in FP8."""
    base = _tiny_llama().float()
    coat = fp8coat.convert(copy.deepcopy(base), "coat").train()
    model = fp8coat.convert(copy.deepcopy(base), FP8_ATTENTION).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = coat(input_ids=IDS, labels=IDS).loss
        loss, report = measure_saved_tensors(lambda: model(input_ids=IDS, labels=IDS).loss, modules=model)
    assert_bit_equal(loss, expected)
    assert _saves_fp8_attention_inputs(report)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def _unregistered():
    """A context without fp8coat's registration (as in a process that never imported fp8coat)."""
    import contextlib

    from transformers import AttentionInterface, AttentionMaskInterface

    @contextlib.contextmanager
    def ctx():
        saved = [(m, m._global_mapping.pop(ATTENTION_NAME)) for m in (AttentionInterface, AttentionMaskInterface)]
        try:
            yield
        finally:
            for m, fn in saved:
                m._global_mapping[ATTENTION_NAME] = fn
    return ctx()


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_save_pretrained_writes_plain_sdpa_and_loads_without_fp8coat(family, tmp_path):
    """The name lives in the configs' ``_attn_implementation``, which transformers never writes: the checkpoint of a
    converted model is the unconverted model's (same config.json, same tensors), and a process without fp8coat's
    registration (emulated by removing it) loads it as an SDPA model whose forward is the unconverted one."""
    base = _tiny_llama() if family == "llama" else V.build(family).bfloat16()
    model = fp8coat.convert(copy.deepcopy(base), FP8_ATTENTION)
    model.save_pretrained(tmp_path / "converted")
    base.save_pretrained(tmp_path / "plain")
    text = (tmp_path / "converted" / "config.json").read_text()
    assert ATTENTION_NAME not in text
    assert json.loads(text) == json.loads((tmp_path / "plain" / "config.json").read_text())
    inputs = dict(input_ids=IDS) if family == "llama" else V.inputs(family, seed=3, dtype=torch.bfloat16)
    with _unregistered():
        loaded, plain = (type(base).from_pretrained(tmp_path / name).eval() for name in ("converted", "plain"))
        assert loaded.config.get_text_config()._attn_implementation == "sdpa"
        with torch.no_grad():
            assert_bit_equal(loaded(**inputs).logits, plain(**inputs).logits)
    again = pickle.loads(pickle.dumps(model))  # the copy stays converted and finds the name registered
    assert conversion_summary(again) == conversion_summary(model)
    assert again.config.get_text_config()._attn_implementation == ATTENTION_NAME


def test_compiled_layers_equal_eager_and_stay_one_graph():
    """torch.compile (aot_eager) of each decoder layer: the two custom ops are opaque nodes inside one graph (no
    graph break), and 2 training steps give the eager losses and gradients bit for bit. (Inductor also compiles
    it; its own fusions change the last bits of the other ops.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def steps(compiled: bool):
        model = fp8coat.convert(_tiny_llama(), FP8_ATTENTION).train()
        torch._dynamo.reset()
        counters.clear()
        if compiled:
            fp8coat.compile_layers(model.model.layers, backend="aot_eager", fullgraph=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out = []
        for _ in range(2):
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        return out, graphs

    (compiled, graphs), (eager, _) = steps(True), steps(False)
    assert graphs == 1
    for (la, ga), (lb, gb) in zip(compiled, eager):
        assert_bit_equal(la, lb)
        for a, b in zip(ga, gb):
            assert_bit_equal(a, b)
