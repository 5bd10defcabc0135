"""fp8coat.convert on tiny HF vision-language models (tests/vlm_models.py): LLaVA with a CLIP or SigLIP vision tower
and a Llama or Qwen2 LM, Qwen2-VL, Qwen2.5-VL.

What converts (``coat``; ``fp8-linear`` converts the same linears and nothing else): in the vision encoder every
block's norms, linears (CLIP/SigLIP q/k/v as one group, Qwen's fused ``qkv``), MLP activation (quick-GELU for CLIP
and Qwen2-VL, tanh-GELU for SigLIP) or gated MLP (Qwen2.5-VL), plus CLIP's ``pre_layrnorm``; in the LM every decoder
layer as for the text-only models. High precision: patch embedding (Conv2d / Conv3d), position embeddings, the
attention core, the projector (LLaVA) / patch merger (Qwen), the vision tower's ``post_layernorm``, the LM's
embedding, final norm and head.

Bytes saved for backward (bf16 model, batch 2, ``measure_saved_tensors`` of the loss), coat / bf16, exact: the
converted modules' bytes are asserted against the formulas of :func:`_converted_bytes`, and the modules that do not
convert are asserted to save the same tensors under both recipes:

    family             vision encoder             LM (embedding, decoder layers, final norm)
    llava-clip          53504 /  78528 = 0.6813   145144 / 342048 = 0.4243
    llava-siglip        45864 /  62208 = 0.7373   145144 / 342048 = 0.4243
    llava-clip-qwen2    53504 /  78528 = 0.6813   145144 / 342048 = 0.4243
    qwen2-vl            95808 / 169488 = 0.5653    95368 / 221040 = 0.4315
    qwen2.5-vl          97992 / 218752 = 0.4480    95368 / 221040 = 0.4315

In Qwen's vision blocks ``coat`` also hands SDPA a compact copy of v (a view of the fused qkv output, which it would
keep whole). The LMs reach <= 0.45 (asserted). The vision encoders do not (Qwen2.5-VL just does), and cannot at any
shape for CLIP / SigLIP / Qwen2-VL blocks without ``fp8_attention``: their attention core keeps q, k, v and its
output in bf16 (8 bytes per token and channel, a fifth to a quarter of a block's bf16 bytes), and their GELU MLPs
give less to gain than a gated MLP (SigLIP's tanh-GELU saves only its input in bf16). At these tiny shapes the
pixels saved by the patch embedding (12 KB of LLaVA's 78 KB, 24 KB of Qwen's) and the padding of the FP8 transposed
linear inputs to a multiple of 16 tokens (34 CLIP tokens -> 48) add to that. The converted modules alone save 0.45
(CLIP) to 0.26 (Qwen2.5-VL) of their bf16 bytes at real shapes (docs/vlm.md). In LLaVA only the vision layers up to
the feature layer (-2: the first of two) are on the loss path and counted.

With ``Recipe.fp8_attention`` the attention cores keep FP8 q, k, v instead (:func:`_attention_bytes`, exact), and the
vision encoders save 0.557 (CLIP) / 0.589 (SigLIP) / 0.457 (Qwen2-VL) / 0.364 (Qwen2.5-VL) of bf16's bytes, the LMs
0.346 (LLaVA) / 0.353 (Qwen) (:data:`RATIOS_FP8_ATTENTION`).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import vlm_models as V

import fp8coat
from fp8coat.conversion import conversion_summary
from fp8coat.memory import measure_saved_tensors
from fp8coat.nn._swap import is_swapped

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LLAVA = ("llava-clip", "llava-siglip", "llava-clip-qwen2")


def _pair(family: str, recipe: str):
    """(bf16 model, its converted deep copy), both in training mode."""
    base = V.build(family).bfloat16()
    model = fp8coat.convert(copy.deepcopy(base), recipe)
    return base.train(), model.train()


def _vision_encoder_summary(model) -> dict:
    """conversion_summary of the vision encoder without the Qwen patch merger."""
    counts = conversion_summary(V.vision_tower(model))
    merger = conversion_summary(V.projector(model)) if not hasattr(model.model, "multi_modal_projector") else {}
    return {k: v - merger.get(k, 0) for k, v in counts.items() if v - merger.get(k, 0)}


# converted modules per part (coat); fp8-linear: only the FP8LinearMixin entries
EXPECTED_COUNTS = {
    "clip": {"FP8LayerNormMixin": 5, "FP8LinearMixin": 12, "FP8ActivationMixin": 2},  # pre_layrnorm + 2 layers
    "siglip": {"FP8LayerNormMixin": 4, "FP8LinearMixin": 12, "FP8ActivationMixin": 2},
    "qwen2-vl": {"FP8LayerNormMixin": 4, "FP8LinearMixin": 8, "FP8ActivationMixin": 2, "FP8AttentionMixin": 2},
    "qwen2.5-vl": {"FP8RMSNormMixin": 4, "FP8LinearMixin": 10, "FP8GatedMLPMixin": 2, "FP8ActivationMixin": 2,
                   "FP8AttentionMixin": 2},
    # decoder layers: q k v o gate up down, the gated MLP (and its act_fn, which the fused MLP does not call)
    "lm": {"FP8LinearMixin": 14, "FP8GatedMLPMixin": 2, "FP8ActivationMixin": 2, "FP8RMSNormMixin": 4},
}


def _vision_kind(family: str) -> str:
    return {"llava-clip": "clip", "llava-clip-qwen2": "clip", "llava-siglip": "siglip"}.get(family, family)


@pytest.mark.parametrize("family", V.FAMILIES)
@pytest.mark.parametrize("recipe", ["fp8-linear", "coat"])
def test_conversion_keeps_keys_and_eval_and_counts(family, recipe):
    base, model = _pair(family, recipe)
    assert list(model.state_dict()) == list(base.state_dict())
    vision, lm = EXPECTED_COUNTS[_vision_kind(family)], EXPECTED_COUNTS["lm"]
    if recipe == "fp8-linear":
        vision, lm = ({"FP8LinearMixin": c["FP8LinearMixin"]} for c in (vision, lm))
    assert _vision_encoder_summary(model) == vision
    assert conversion_summary(V.language_model(model)) == lm
    assert conversion_summary(model) == {k: vision.get(k, 0) + lm.get(k, 0) for k in {*vision, *lm}}
    # high precision: projector / merger, patch and position embeddings, LM head, final norms
    assert conversion_summary(V.projector(model)) == {}
    assert not any(is_swapped(m) for m in (model.lm_head, V.language_model(model).norm,
                                           V.language_model(model).embed_tokens))
    assert not any(is_swapped(m) for m in V.vision_tower(model).modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)))
    inputs = V.inputs(family, seed=3, dtype=torch.bfloat16)
    base.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(base(**inputs).logits, model(**inputs).logits)  # eval runs the original forwards
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# bytes saved for backward


def _pad(t: int) -> int:
    return -(-t // 16) * 16


def _fp8_groups(t: int, n: int) -> int:
    """t rows of n values in E4M3 with fp32 1×16 scales."""
    return t * n + 4 * t * -(-n // 16)


def _converted_bytes(family: str, part: str, recipe: str, batch: int = 2, text: int = 12,
                     frozen_linears: bool = False) -> int:
    """Bytes that the converted modules of ``part`` ("vision" or "lm") save in a bf16 model on the CPU, per recipe:

    * LayerNorm (t tokens, width d): bf16 x, mean, rstd (bf16 (t, 1) on the CPU) = 2td + 4t; coat x − mean in FP8 1×16 +
      fp32 rstd. HF RMSNorm (eager): fp32 x (pow), fp32 rstd, bf16 x·rstd = 6td + 4t; coat x in FP8 + rstd.
    * Linear: bf16 its input (2tk; nothing where the attention output it reads is SDPA's saved output, the LLaVA
      towers' out_proj and the LMs' o_proj, or where its weight is frozen); FP8 its transposed input (k × t
      padded to 16) + the 0-d fp32 scales of x and of each weight, only the scales where the input is rebuilt from
      the preceding FP8 RMSNorm or LayerNorm (hand-off) or the weight is frozen.
    * quick-GELU: bf16 x and σ(1.702x) (4ti, and the 8-byte fp64 scalar 1.702 that :func:`_split` finds under no
      module); tanh-GELU: x (2ti); coat x in FP8.
    * gated MLP (Llama, Qwen2, Qwen2.5-VL vision): bf16 the shared gate/up input, silu's input, its output and up
      (the product), down's input (2td + 8ti); coat gate and up in FP8, the scales of three GEMMs (20 bytes).
    """
    bf16 = recipe == "bf16"

    def ln(t, d):
        return 2 * t * d + 4 * t if bf16 else _fp8_groups(t, d) + 4 * t

    def rms(t, d):
        return 6 * t * d + 4 * t if bf16 else _fp8_groups(t, d) + 4 * t

    def linear(t, k, weights=1, hp_shared=False, handoff=False):
        if bf16:
            return 0 if hp_shared or frozen_linears else 2 * t * k
        scales = 4 + 4 * weights
        return scales if handoff or frozen_linears else k * _pad(t) + scales

    def act(t, i, kind):
        if bf16:
            return {"quick_gelu": 4, "gelu_tanh": 2}[kind] * t * i
        return _fp8_groups(t, i)

    def gated_mlp(t, d, i):
        return 2 * t * d + 8 * t * i if bf16 else 2 * _fp8_groups(t, i) + 20

    d, i_lm, layers = 64, 176, 2
    if part == "lm":
        t = batch * ((V.IMAGES_PER_LLAVA if family in LLAVA else V.MERGED_PER_QWEN + 2) + text)
        per_layer = (2 * rms(t, d) + linear(t, d, 3, handoff=True) + linear(t, d, hp_shared=True)
                     + gated_mlp(t, d, i_lm))
        return layers * per_layer
    i = 128
    if family in LLAVA:  # one layer on the loss path (feature layer -2 of 2)
        clip = family != "llava-siglip"
        t = batch * (V.IMAGES_PER_LLAVA + clip)
        # LayerNorms handing their FP8 input to q/k/v and to fc1
        block = (2 * ln(t, d) + linear(t, d, 3, handoff=True) + linear(t, d, hp_shared=True)
                 + linear(t, d, handoff=True) + act(t, i, "quick_gelu" if clip else "gelu_tanh") + linear(t, i))
        return block + (ln(t, d) if clip else 0)  # CLIP's pre_layrnorm
    t = batch * V.IMAGES_PER_LLAVA
    if family == "qwen2-vl":  # LayerNorms handing their FP8 input to qkv and to fc1
        block = (2 * ln(t, d) + 2 * linear(t, d, handoff=True) + linear(t, d) + act(t, i, "quick_gelu")
                 + linear(t, i))
    else:  # Qwen2.5-VL: RMSNorms handing their FP8 input to qkv and the gated MLP
        block = 2 * rms(t, d) + linear(t, d, handoff=True) + linear(t, d) + gated_mlp(t, d, i)
    # the attention modules convert too (fused qkv: compact SDPA inputs under coat), with the vision RoPE's fp32 cos
    # and sin (t × head dim 16 each) that their q·cos and rot(q)·sin keep, shared by the blocks
    return layers * block + _attention_bytes(family, "vision", recipe, batch, text) + 2 * t * 16 * 4


def _part(family: str, fqn: str) -> str:
    if fqn.startswith("model.language_model"):
        return "lm"
    if fqn.startswith(("model.vision_tower", "model.visual")) and ".merger" not in fqn:
        return "vision"
    return "other"


def _split(model, report) -> dict:
    """{part: ({unconverted module: bytes}, bytes of converted modules)} from ``report.by_module``; a module counts
    as converted when it, or its parent (the parts of a fused gated MLP), is swapped in the converted model.
    Part "unattributed": what was saved under no module — the 0-d fp64 scalar (8 bytes) of each bf16 quick-GELU
    call, ``x * sigmoid(1.702 * x)``: torch saves the wrapped Python number without calling saved-tensor hooks, so
    the measurement cannot tell which module saved it (it is counted, as ``by_module[""]``)."""
    modules = dict(model.named_modules())
    out = {"vision": ({}, 0), "lm": ({}, 0), "other": ({}, 0), "unattributed": report.by_module.get("", 0)}
    for fqn, nbytes in report.by_module.items():
        if not fqn:
            continue
        part = _part("", fqn)
        same, converted = out[part]
        parent = modules.get(fqn.rpartition(".")[0])
        if is_swapped(modules.get(fqn, model)) or (parent is not None and is_swapped(parent)):
            out[part] = (same, converted + nbytes)
        else:
            same[fqn] = nbytes
    return out


RATIOS = {  # coat / bf16 bytes saved for backward: (vision encoder, LM)
    "llava-clip": (0.6813, 0.4243), "llava-siglip": (0.7373, 0.4243), "llava-clip-qwen2": (0.6813, 0.4243),
    "qwen2-vl": (0.5653, 0.4315), "qwen2.5-vl": (0.448, 0.4315),
}
QUICK_GELU_CALLS = {"llava-clip": 1, "llava-clip-qwen2": 1, "qwen2-vl": 2}  # bf16, on the loss path


@pytest.mark.parametrize("family", V.FAMILIES)
def test_saved_bytes_vision_and_lm_exact(family):
    models = _pair(family, "coat")
    inputs = V.inputs(family, dtype=torch.bfloat16)
    totals = {}
    for recipe, model in zip(("bf16", "coat"), models):
        _, report = measure_saved_tensors(lambda m=model: m(**inputs).loss, modules=model)
        totals[recipe] = _split(models[1], report)
    unattributed = totals["bf16"]["unattributed"]
    assert (unattributed, totals["coat"]["unattributed"]) == (8 * QUICK_GELU_CALLS.get(family, 0), 0)
    for k, part in enumerate(("vision", "lm")):
        (same_b, conv_b), (same_c, conv_c) = totals["bf16"][part], totals["coat"][part]
        assert same_b == same_c  # modules that stay high precision save the same tensors under both recipes
        assert conv_b == _converted_bytes(family, part, "bf16")
        assert conv_c == _converted_bytes(family, part, "coat")
        bf16, coat = sum(same_b.values()) + conv_b, sum(same_c.values()) + conv_c
        bf16 += unattributed if part == "vision" else 0  # the bf16 quick-GELUs' scalars
        print(f"{family} {part}: coat {coat} / bf16 {bf16} = {coat / bf16:.4f}")
        assert round(coat / bf16, 4) == RATIOS[family][k]
        if part == "lm":
            assert coat / bf16 <= 0.45
    assert totals["bf16"]["other"] == totals["coat"]["other"]  # projector / merger, LM head and loss


def _attention_bytes(family: str, part: str, mode: str, batch: int = 2, text: int = 12) -> int:
    """Bytes the attention cores of ``part`` on the loss path save in a bf16 model on the CPU (t tokens, width d,
    4 heads of 16, the LMs' k and v at 2 heads), ``mode`` ``bf16``, ``coat`` or ``fp8`` (``fp8_attention``):

    * SDPA (``ScaledDotProductFlashAttentionForCpu``): the storages of q, k, v and of its output, bf16, and the fp32
      log-sum-exp (4 per token and head). In the LLaVA towers q, k, v are views of the q/k/v projections' outputs
      (2td each); in Qwen's vision blocks q and k are RoPE's outputs (2td each) and v a view of the fused qkv
      output, which it keeps whole (6td) in bf16 and which ``coat`` replaces by a compact copy of v (2td); each
      image's chunk has its own output and log-sum-exp. In the LMs: q and k RoPE's outputs, v the projection's
      output.
    * ``fp8``: q, k, v in E4M3 with fp32 1×16 scales (16 + 4 bytes per token and head), nothing else.
    """
    fp8 = mode == "fp8"
    heads, head_dim = 4, 16
    if part == "lm":
        t, layers, kv_heads = batch * ((V.IMAGES_PER_LLAVA if family in LLAVA else V.MERGED_PER_QWEN + 2) + text), 2, 2
    elif family in LLAVA:
        t, layers, kv_heads = batch * (V.IMAGES_PER_LLAVA + (family != "llava-siglip")), 1, heads
    else:
        t, layers, kv_heads = batch * V.IMAGES_PER_LLAVA, 2, heads
    if fp8:
        return layers * (heads + 2 * kv_heads) * t * (head_dim + 4 * -(-head_dim // 16))
    q, kv = heads * head_dim, kv_heads * head_dim
    v_storage = 3 * q if part == "vision" and family not in LLAVA and mode == "bf16" else kv
    return layers * (2 * t * (2 * q + kv + v_storage) + 4 * t * heads)


RATIOS_FP8_ATTENTION = {  # coat with fp8_attention / bf16 bytes saved for backward: (vision encoder, LM)
    "llava-clip": (0.5566, 0.3458), "llava-siglip": (0.5891, 0.3458), "llava-clip-qwen2": (0.5566, 0.3458),
    "qwen2-vl": (0.4565, 0.3533), "qwen2.5-vl": (0.3637, 0.3533),
}


@pytest.mark.parametrize("family", V.FAMILIES)
def test_fp8_attention_saved_bytes_vision_and_lm_exact(family):
    """``Recipe.fp8_attention``: per part, what ``coat`` saves less what its attention cores' SDPA saves plus
    their FP8 q, k, v (:func:`_attention_bytes`, each asserted against the measurement), exactly; below ``coat``."""
    fa = fp8coat.get_recipe("coat").with_options(fp8_attention=True)
    base = V.build(family).bfloat16()
    inputs = V.inputs(family, dtype=torch.bfloat16)
    totals, attention = {}, {}
    for name, recipe in (("bf16", "bf16"), ("coat", "coat"), ("fa", fa)):
        model = fp8coat.convert(copy.deepcopy(base), recipe).train()
        _, report = measure_saved_tensors(lambda m=model: m(**inputs).loss, modules=model)
        totals[name] = {part: sum(b for fqn, b in report.by_module.items() if _part(family, fqn) == part)
                        for part in ("vision", "lm")}
        totals[name]["vision"] += report.by_module.get("", 0)  # the bf16 quick-GELUs' scalars
        cores = [(op, _part(family, module), nbytes) for op, module, _, _, nbytes in report.entries
                 if module.endswith(("self_attn", ".attn"))]
        attention[name] = {part: sum(b for op, p, b in cores if p == part and op in (
            "ScaledDotProductFlashAttentionForCpu", "_EagerOpBackward")) for part in ("vision", "lm")}
    for k, part in enumerate(("vision", "lm")):
        sdpa, fp8 = _attention_bytes(family, part, "coat"), _attention_bytes(family, part, "fp8")
        assert attention["coat"][part] == sdpa and attention["fa"][part] == fp8
        assert totals["fa"][part] == totals["coat"][part] - sdpa + fp8 < totals["coat"][part]
        ratio = totals["fa"][part] / totals["bf16"][part]
        print(f"{family} {part}: coat+fp8_attention {totals['fa'][part]} / bf16 {totals['bf16'][part]} = "
              f"{ratio:.4f} (coat {totals['coat'][part] / totals['bf16'][part]:.4f})")
        assert round(ratio, 4) == RATIOS_FP8_ATTENTION[family][k]


# ---------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("family", V.FAMILIES)
def test_coat_training_tracks_bf16(family):
    """6 steps of fp8coat.AdamW (lr 1e-3) on one batch from the same initial weights: every step's loss of the coat
    model within 1% of the bf16 model's (measured: <= 0.25%), and both learn (last loss < 0.9 × first)."""
    inputs = V.inputs(family, dtype=torch.bfloat16)
    curves = []
    for model in _pair(family, "coat"):
        opt = fp8coat.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        losses = []
        for _ in range(6):
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    bf16, coat = curves
    print(family, "bf16", [f"{x:.4f}" for x in bf16], "coat", [f"{x:.4f}" for x in coat])
    assert all(abs(c / b - 1) < 0.01 for b, c in zip(bf16, coat))
    assert bf16[-1] < 0.9 * bf16[0] and coat[-1] < 0.9 * coat[0]


@pytest.mark.parametrize("family", ["llava-clip", "llava-siglip", "qwen2-vl"])
def test_layernorm_hands_its_input_to_the_linears_after_it(family):
    """Vision blocks with LayerNorms: each norm is linked to the q/k/v linears (or fused qkv) and to fc1, which
    save nothing of their input and rebuild it in backward from the norm's FP8 input. Against the same model with
    the links removed: every gradient but those linears' weight gradients bit-equal, those above 25 dB SQNR (the
    input rebuilt from the FP8 copy of the norm's input instead of quantized from the norm's output)."""
    from helpers import sqnr_db

    from fp8coat.nn.handoff import describe_handoffs

    _, linked = _pair(family, "coat")
    links = [d for d in describe_handoffs(linked) if "vision" in d or "visual" in d]
    consumers = {"q_proj", "k_proj", "v_proj", "qkv", "fc1"}
    assert len(links) == 2 * 2 and all(("norm1 ->" in d or "norm2 ->" in d) for d in links)  # 2 blocks
    unlinked = copy.deepcopy(linked)
    for name, m in unlinked.named_modules():
        if not ("vision" in name or "visual" in name):
            continue
        if hasattr(m, "_fp8coat_handoff"):
            m._fp8coat_handoff = None
        if getattr(m, "handoff", None) is not None:
            m.handoff = None
    assert [d for d in describe_handoffs(unlinked) if "vision" in d or "visual" in d] == []
    inputs = V.inputs(family, seed=4, dtype=torch.bfloat16)
    grads = []
    for model in (linked, unlinked):
        model.train()
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    rebuilt = [n for n in grads[0] if ("vision" in n or "visual" in n) and n.split(".")[-2] in consumers
               and n.endswith("weight")]
    assert rebuilt
    for name, g in grads[0].items():
        if name not in rebuilt:
            assert torch.equal(g, grads[1][name]), name
    sqnr = {n: sqnr_db(grads[1][n].float(), grads[0][n].float()) for n in rebuilt}
    assert min(sqnr.values()) > 25, sqnr  # measured 27.8-30 dB: about one E4M3 rounding of the input apart


@pytest.mark.parametrize("family", ["llava-clip", "qwen2-vl"])
def test_frozen_vision_tower(family):
    """``requires_grad_(False)`` on the vision tower (Qwen: with its merger): conversion still applies, its
    parameters get no gradient, an optimizer over the trainable parameters holds no state for them, and the tower
    saves nothing for backward (nothing upstream needs a gradient) under either recipe."""
    inputs = V.inputs(family, dtype=torch.bfloat16)
    for model in _pair(family, "coat"):
        tower = V.vision_tower(model)
        tower.requires_grad_(False)
        frozen = {id(p) for p in tower.parameters()}
        opt = fp8coat.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-3)
        _, report = measure_saved_tensors(lambda m=model: m(**inputs).loss, modules=model)
        assert sum(b for fqn, b in report.by_module.items() if _part(family, fqn) == "vision") == 0
        for _ in range(2):
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        for p in model.parameters():
            assert (p.grad is None) == (id(p) in frozen)
        assert opt.state and not any(id(p) in frozen for p in opt.state)
        assert all(id(p) not in frozen for g in opt.param_groups for p in g["params"])
    assert _vision_encoder_summary(model) == EXPECTED_COUNTS[_vision_kind(family)]


def test_frozen_blocks_with_a_trainable_patch_embedding():
    """Frozen CLIP blocks below a trainable patch embedding: the gradient passes through them. Their FP8 linears
    need no weight gradient and save only their scales (bf16's nn.Linear saves nothing then either); norms and the
    activation save FP8 as before — coat 44288 / bf16 61112 bytes (0.72; the pixels and the attention core
    are 30240 of them)."""
    inputs = V.inputs("llava-clip", dtype=torch.bfloat16)
    saved = {}
    models = _pair("llava-clip", "coat")
    for recipe, model in zip(("bf16", "coat"), models):
        tower = V.vision_tower(model)
        tower.requires_grad_(False)
        tower.embeddings.patch_embedding.requires_grad_(True)
        _, report = measure_saved_tensors(lambda m=model: m(**inputs).loss, modules=model)
        same, converted = _split(models[1], report)["vision"]
        assert converted == _converted_bytes("llava-clip", "vision", recipe, frozen_linears=True)
        saved[recipe] = sum(same.values()) + converted
        model(**inputs).loss.backward()
        assert tower.embeddings.patch_embedding.weight.grad is not None
        assert all(p.grad is None for n, p in tower.named_parameters() if "patch_embedding" not in n)
    assert (saved["coat"], saved["bf16"]) == (44288, 61112)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and copies


@pytest.mark.parametrize("family", ["llava-clip", "qwen2-vl"])
def test_save_pretrained_from_pretrained_round_trip(family, tmp_path):
    """``save_pretrained`` writes a plain HF checkpoint; ``from_pretrained`` gives the unconverted model with the same
    tensors (convert it again to train in FP8), as for text-only models; copies (deepcopy, pickle) stay converted.

    (Loaded models are compared with loaded models: ``.bfloat16()`` on the built model also rounds the rotary
    ``inv_freq`` buffers, which are not saved and which ``from_pretrained`` computes in fp32. The pickled copy is
    taken before any forward: transformers 5 then installs output-capturing hooks, local functions that pickle
    cannot store, on any model, converted or not.)"""
    _, model = _pair(family, "coat")
    pickled = pickle.loads(pickle.dumps(model))
    opt = fp8coat.AdamW(model.parameters(), lr=1e-2)
    model(**V.inputs(family, dtype=torch.bfloat16)).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    cls = type(model)
    plain = cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(plain) is cls and conversion_summary(plain) == {}
    state, loaded_state = model.state_dict(), plain.state_dict()
    assert list(state) == list(loaded_state)
    for k in state:
        assert torch.equal(state[k], loaded_state[k]), k
    again, again2 = (fp8coat.convert(cls.from_pretrained(tmp_path, dtype=torch.bfloat16), "coat") for _ in range(2))
    pickled.load_state_dict(model.state_dict())
    copies = [copy.deepcopy(model), pickled]
    assert all(conversion_summary(c) == conversion_summary(model) for c in [again, *copies])
    inputs = V.inputs(family, seed=5, dtype=torch.bfloat16)
    plain.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, again(**inputs).logits)  # eval: the original forwards
        again.train(), again2.train(), model.train()
        # the training-mode FP8 forward is a function of the weights (and buffers)
        assert torch.equal(again(**inputs).logits, again2(**inputs).logits)
        ref = model(**inputs).logits
        assert all(torch.equal(c.train()(**inputs).logits, ref) for c in copies)


# ---------------------------------------------------------------------------------------------------------------
# modules that must not convert


def test_multihead_attention_out_proj_and_linears_with_their_own_forward_stay():
    """SigLIP's pooling head (``vision_use_head``) runs ``nn.MultiheadAttention``, which reads ``out_proj.weight``
    itself: its out_proj never converts, even when a filter selects every module; nor does an ``nn.Linear``
    subclass with its own forward (a router). The head's MLP and norm convert when selected."""

    class Router(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x.float(), self.weight.float()).softmax(-1)

    cfg = transformers.SiglipVisionConfig(**V._vision_tower_kwargs())  # vision_use_head=True by default
    torch.manual_seed(0)
    tower = transformers.SiglipVisionModel(cfg).bfloat16()
    tower.head.router = Router(64, 4).bfloat16()
    default = fp8coat.convert(copy.deepcopy(tower), "coat")
    assert conversion_summary(default.head) == {}  # outside the encoder's ModuleList
    every = fp8coat.convert(copy.deepcopy(tower), "coat", module_filter_fn=lambda module, fqn: True)
    assert not is_swapped(every.head.attention.out_proj) and not is_swapped(every.head.router)
    assert conversion_summary(every.head) == {"FP8LinearMixin": 2, "FP8LayerNormMixin": 1, "FP8ActivationMixin": 1}
    pixels = torch.randn(2, 3, V.IMAGE_SIZE, V.IMAGE_SIZE).bfloat16()
    every.train()
    out = every(pixel_values=pixels).pooler_output
    out.float().square().mean().backward()
    assert every.head.attention.out_proj.weight.grad is not None
