"""The memory planner against exact measurements on tiny models (CPU), the measured GPU layer figures, and its CLI.

Saved-for-backward bytes are compared exactly, per autograd op, with ``measure_saved_tensors``; optimizer states
with ``optimizer_state_bytes`` after one step; weights, masters and FP8 weight copies with the tensors' bytes.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fp8coat
from fp8coat.conversion import weight_caches
from fp8coat.memory import (
    ModelShape,
    PlanSettings,
    layer_saved_bytes,
    max_batch,
    measure_saved_tensors,
    optimizer_state_bytes,
    plan_memory,
    rest_saved_bytes,
)
from fp8coat.memory.layer_saved import attention_saved_bytes, checkpointed_layer_bytes, rope_saved_bytes
from fp8coat.memory.plan import GIB
from fp8coat.memory.state_bytes import master_bytes, optimizer_state_bytes_of
from fp8coat.ops.cross_entropy import linear_cross_entropy
from fp8coat.train.cli import main

transformers = pytest.importorskip("transformers")

H, HEADS, INTER, VOCAB = 64, 4, 176, 96
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "amp": torch.float32}


def _config(model_type: str = "llama", kv_heads: int = HEADS, layers: int = 1, tied: bool = False):
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    extra = {"head_dim": 32} if model_type == "qwen3" else {}  # Qwen3's head_dim is its own, not H / heads
    cfg = classes[model_type](vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers,
                              num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=64,
                              tie_word_embeddings=tied, **extra)
    cfg._attn_implementation = "sdpa"
    return cfg


def _model(cfg, precision: str, recipe: str, cache_fp8_weights: bool = False):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(DTYPES[precision])
    return fp8coat.convert(model, fp8coat.get_recipe(recipe).with_options(cache_fp8_weights=cache_fp8_weights)).train()


def _add(*dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return {k: v for k, v in total.items() if v}


# ---------------------------------------------------------------------------------------------------------------
# saved for backward, exact


LAYER_CASES = [  # (model type, kv heads, batch, seq, precision, recipe)
    *[("llama", 2, 2, 23, prec, recipe) for prec in ("bf16", "fp32") for recipe in ("bf16", "fp8-linear", "coat")],
    ("llama", 2, 2, 23, "amp", "bf16"),
    *[("llama", HEADS, 1, 32, "bf16", recipe) for recipe in ("bf16", "fp8-linear", "coat")],
    *[("qwen2", 2, 3, 7, prec, recipe) for prec in ("bf16", "amp") for recipe in ("bf16", "fp8-linear", "coat")
      if prec == "bf16" or recipe == "bf16"],
    *[("qwen3", 2, 2, 9, "bf16", recipe) for recipe in ("bf16", "fp8-linear", "coat")],
    ("qwen3", 1, 2, 9, "amp", "bf16"),
    ("mistral", 1, 2, 12, "fp32", "coat"),
]


@pytest.mark.parametrize("model_type,kv,batch,seq,precision,recipe", LAYER_CASES)
def test_layer_saved_bytes_equal_the_measured_ones_per_op(model_type, kv, batch, seq, precision, recipe):
    cfg = _config(model_type, kv)
    model = _model(cfg, precision, recipe)
    layer = model.model.layers[0]
    x = torch.randn(batch, seq, H, dtype=DTYPES[precision], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp"):
        pe = model.model.rotary_emb(x, torch.arange(seq)[None])
        out, measured = measure_saved_tensors(lambda: layer(x, position_embeddings=pe), modules=layer)
    out.float().sum().backward()
    shape = ModelShape.from_config(cfg)
    planned = _add(layer_saved_bytes(shape, recipe, batch, seq, device="cpu", precision=precision),
                   rope_saved_bytes(shape, seq, precision=precision))
    assert planned == measured.by_op
    assert sum(planned.values()) == measured.total_bytes


@pytest.mark.parametrize("model_type,kv,batch,seq,precision", [
    ("llama", 2, 2, 23, "bf16"), ("llama", HEADS, 1, 32, "fp32"), ("qwen3", 2, 2, 9, "bf16"),
])
def test_fp8_attention_layer_saved_bytes_equal_the_measured_ones_per_op(model_type, kv, batch, seq, precision):
    """``Recipe.fp8_attention``: the attention core keeps FP8 q, k (k, v at the key-value heads) and v with their
    1×16 scales, counted under fp8coat's custom-op node; the rest of the layer as ``coat``."""
    cfg = _config(model_type, kv)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(DTYPES[precision])
    model = fp8coat.convert(model, fp8coat.get_recipe("coat").with_options(fp8_attention=True)).train()
    layer = model.model.layers[0]
    x = torch.randn(batch, seq, H, dtype=DTYPES[precision], requires_grad=True)
    pe = model.model.rotary_emb(x, torch.arange(seq)[None])
    out, measured = measure_saved_tensors(lambda: layer(x, position_embeddings=pe), modules=layer)
    out.float().sum().backward()
    shape = ModelShape.from_config(cfg)
    planned = _add(layer_saved_bytes(shape, "coat", batch, seq, device="cpu", precision=precision,
                                     fp8_attention=True), rope_saved_bytes(shape, seq, precision=precision))
    assert planned == measured.by_op
    coat = layer_saved_bytes(shape, "coat", batch, seq, device="cpu", precision=precision)
    assert sum(planned.values()) < sum(_add(coat, rope_saved_bytes(shape, seq, precision=precision)).values())


def test_fp8_attention_plan_saves_less_and_needs_coat():
    """Llama-2-7B, batch 8 × 2048: the attention core's 8 bytes per token and channel (+ log-sum-exp and cuDNN's
    two int64) become 3 · (1 + 4/16); the attention's backward rebuilds q, k, v, the output and the log-sum-exp, below
    the layer's largest backward workspace (the MLP's)."""
    coat = plan_memory(LLAMA7B, PlanSettings(batch=8, seq=2048))
    fp8 = plan_memory(LLAMA7B, PlanSettings(batch=8, seq=2048, fp8_attention=True))
    t, h, heads = 8 * 2048, 4096, 32
    sdpa, fp8_qkv = 8 * t * h + t * heads * 4 + 16, 3 * (t * h + t * h // 16 * 4)
    assert fp8.layer_activations == coat.layer_activations - sdpa + fp8_qkv
    assert fp8.workspace == coat.workspace and fp8.peak < coat.peak
    assert "coat + FP8 attention inputs" in fp8.table()
    with pytest.raises(ValueError, match="fp8_attention is an option of the coat recipe"):
        PlanSettings(batch=8, seq=2048, recipe="fp8-linear", fp8_attention=True)
    with pytest.raises(ValueError, match="fp8_attention is an option of the coat recipe"):
        layer_saved_bytes(LLAMA7B, "bf16", 1, 16, fp8_attention=True)


def _loss_fn(model, ids, labels, chunked: bool, amp: bool):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if chunked:
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                return linear_cross_entropy(hidden, model.lm_head.weight, labels)
            logits = model(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return run


class _Checkpointed(torch.nn.Module):
    """A decoder layer run under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, **kwargs):
        return checkpoint(self.layer, hidden_states, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("recipe,precision,chunked,ckpt,tied", [
    ("bf16", "bf16", False, False, False), ("bf16", "amp", False, False, False), ("bf16", "amp", True, False, False),
    ("fp8-linear", "bf16", True, False, True), ("coat", "bf16", True, False, False),
    ("coat", "fp32", False, False, False), ("coat", "bf16", False, True, False), ("bf16", "bf16", True, True, False),
])
def test_model_saved_bytes_equal_the_measured_ones(recipe, precision, chunked, ckpt, tied):
    batch, seq, layers = 2, 21, 2
    cfg = _config("llama", 2, layers=layers, tied=tied)
    model = _model(cfg, precision, recipe)
    if ckpt:
        model.model.layers = torch.nn.ModuleList(_Checkpointed(layer) for layer in model.model.layers)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))
    loss, measured = measure_saved_tensors(_loss_fn(model, ids, labels, chunked, precision == "amp"), modules=model)
    loss.backward()
    shape = ModelShape.from_config(cfg)
    if ckpt:
        layer = checkpointed_layer_bytes(shape, batch, seq, precision=precision)
    else:
        layer = layer_saved_bytes(shape, recipe, batch, seq, device="cpu", precision=precision)
    rest = rest_saved_bytes(shape, batch, seq, precision=precision, chunked_loss=chunked, checkpointing=ckpt)
    planned = _add(*[layer] * layers, rest)
    assert planned == measured.by_op
    # the planner's activations + loss entries are the same total
    settings = PlanSettings(batch=batch, seq=seq, recipe=recipe, device="cpu", chunked_loss=chunked,
                            activation_checkpointing=ckpt, optimizer="fp8coat",
                            master_weights="fp32" if precision == "fp32" else "auto") if precision != "amp" else \
        PlanSettings(batch=batch, seq=seq, recipe=recipe, device="cpu", chunked_loss=chunked,
                     activation_checkpointing=ckpt, optimizer="torch")
    plan = plan_memory(shape, settings)
    assert plan.activations + plan.loss_saved == measured.total_bytes


def test_compiled_bf16_layer_saves_what_the_planner_says():
    """torch.compile's partitioner (bf16 recipe, bf16): the layer input, 3 T×H and 3 T×I tensors, both rstd and
    the attention's tensors, plus the parameters (measured here without the module hooks, which would make the
    compiled layer recompile: parameters are then counted as saved tensors too)."""
    batch, seq = 2, 24
    cfg = _config("llama", HEADS)
    model = _model(cfg, "bf16", "bf16")
    layer = model.model.layers[0]
    x = torch.randn(batch, seq, H, dtype=torch.bfloat16, requires_grad=True)
    pe = model.model.rotary_emb(x, torch.arange(seq)[None])
    compiled = torch.compile(layer)
    _, measured = measure_saved_tensors(lambda: compiled(x, position_embeddings=pe))
    shape = ModelShape.from_config(cfg)
    planned = layer_saved_bytes(shape, "bf16", batch, seq, device="cpu", compiled=True)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert measured.total_bytes == sum(planned.values()) + sum(rope_saved_bytes(shape, seq).values()) + params
    assert sum(planned.values()) < sum(layer_saved_bytes(shape, "bf16", batch, seq, device="cpu").values())


# ---------------------------------------------------------------------------------------------------------------
# the measured GPU figures (H200, Llama-2-7B layer, batch 4 × 2048; docs/results/layers/2026-11-30-v7-run8.json)


LLAMA7B = ModelShape("llama", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008,
                     vocab=32000)


def test_cuda_attention_and_layer_formulas_reproduce_the_h200_measurements():
    attention = attention_saved_bytes(LLAMA7B, 4, 2048, device="cuda")
    assert attention == {"ScaledDotProductCudnnAttention": 269_484_048}
    rope = rope_saved_bytes(LLAMA7B, 2048)
    bf16 = _add(layer_saved_bytes(LLAMA7B, "bf16", 4, 2048), rope)
    assert bf16 == {"Mul": 495_976_448, "Mm": 314_572_800, "ScaledDotProductCudnnAttention": 269_484_048,
                    "Pow": 268_435_456, "Silu": 180_355_072, "Rsqrt": 65_536}
    assert sum(bf16.values()) == 1_528_889_360
    coat = sum(_add(layer_saved_bytes(LLAMA7B, "coat", 4, 2048), rope).values())
    # measured at 05642ba, whose FP8 linear op kept only its input's fp32 scale; since then it also keeps one fp32
    # scale per weight: 7 weights, 28 bytes more
    assert coat == 613_482_528 + 7 * 4


def test_llama7b_bf16_torch_adamw_peak_is_within_10_percent_of_the_measured_one():
    """Measured: 131.8 GiB at batch 3 × 2048 (fp32 parameters, bf16 autocast, fused torch AdamW, eager)."""
    plan = plan_memory(LLAMA7B, PlanSettings(batch=3, seq=2048, recipe="bf16", optimizer="torch",
                                             chunked_loss=False))
    assert abs(plan.peak / GIB / 131.8 - 1) < 0.10
    assert plan.settings.precision == "amp" and plan.weights == LLAMA7B.n_params * 4


@pytest.mark.parametrize("batch,seq,measured_gib", [(3, 2048, 115.666), (1, 4096, 106.316)])
def test_llama7b_compiled_bf16_autocast_peak_is_within_10_percent_of_the_measured_one(batch, seq, measured_gib):
    """Measured on the H200 (docs/results/llama7b/2026-12-05-h200-seq{2048,4096}.json, ``bf16amp_compiled``: fp32
    parameters, bf16 autocast, each decoder layer compiled, fused torch AdamW)."""
    settings = PlanSettings(batch=batch, seq=seq, recipe="bf16", optimizer="torch", chunked_loss=False,
                            compiled=True)
    assert abs(plan_memory(LLAMA7B, settings).peak / GIB / measured_gib - 1) < 0.10


def test_compiled_autocast_layer_keeps_one_cast_per_shared_input_and_no_weight_casts():
    t, h, i = 3 * 2048, LLAMA7B.hidden, LLAMA7B.intermediate
    eager = sum(layer_saved_bytes(LLAMA7B, "bf16", 3, 2048, precision="amp").values())
    compiled = sum(layer_saved_bytes(LLAMA7B, "bf16", 3, 2048, precision="amp", compiled=True).values())
    weight_casts = sum(w.numel for w in LLAMA7B.linear_weights()) * 2
    assert eager - compiled == weight_casts + (2 + 1) * t * h * 2  # q/k/v share one input cast, gate/up one
    assert i * h * 2 * 3 < weight_casts


# ---------------------------------------------------------------------------------------------------------------
# parameters, optimizer states, masters, FP8 weight copies


@pytest.mark.parametrize("model_type,kv,tied", [("llama", 2, False), ("llama", HEADS, True), ("qwen2", 2, False),
                                                ("qwen3", 1, False)])
def test_parameters_are_the_models(model_type, kv, tied):
    cfg = _config(model_type, kv, layers=2, tied=tied)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    shape = ModelShape.from_config(cfg)
    assert [(p.name, p.shape) for p in shape.parameters()] == \
        [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert shape.n_params == sum(p.numel() for p in model.parameters())


def _one_step(model, opt, batch=2, seq=12):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().sum().backward()
    opt.step()


@pytest.mark.parametrize("optimizer,master", [("fp8coat", "bf16-remainder"), ("fp8coat", "bf16-stochastic"),
                                              ("fp8coat", "none"), ("fp8coat", "fp32"), ("torch", "auto")])
def test_optimizer_states_masters_and_weights_equal_the_tensors(optimizer, master):
    cfg = _config("qwen2", 2, layers=2)  # biases: 1-D parameters; q/k/v and norms below 4096 elements
    settings = PlanSettings(batch=2, seq=12, recipe="coat", optimizer=optimizer, master_weights=master,
                            cache_fp8_weights=True, device="cpu")
    model = _model(cfg, "fp32" if settings.param_dtype == "fp32" else "bf16", "coat", cache_fp8_weights=True)
    if optimizer == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = fp8coat.AdamW(model.parameters(), lr=1e-3, master_weights=master, min_quantized_numel=4096)
    _one_step(model, opt)
    plan = plan_memory(ModelShape.from_config(cfg), settings)
    assert plan.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.optimizer_states + plan.master_weights == optimizer_state_bytes(opt)
    remainders = sum(s["master_remainder"].numel() * 2 for s in opt.state.values() if "master_remainder" in s)
    assert plan.master_weights == remainders
    assert plan.gradients == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert plan.fp8_weight_copies == sum(c.nbytes for c in weight_caches(model))
    assert plan.fp8_weight_copies > 0


def test_state_formulas_per_tensor():
    # fp8coat: FP8 moments only for >= 2 dims and >= 4096 elements; 0-d counts as one element
    assert optimizer_state_bytes_of((256, 300), "fp8coat", "bf16") == 2 * (256 * 300 + 256 * 3 * 5)
    assert optimizer_state_bytes_of((256, 300), "fp8coat", "bf16", expansion=False) == 2 * (256 * 300 + 256 * 3 * 4)
    assert optimizer_state_bytes_of((64, 63), "fp8coat", "bf16") == 2 * 4 * 64 * 63
    assert optimizer_state_bytes_of((8192,), "fp8coat", "bf16") == 2 * 4 * 8192
    assert optimizer_state_bytes_of((), "fp8coat", "bf16") == 8
    # torchao AdamWFp8: >= 4096 elements and a multiple of 256 -> FP8 codes + an fp32 scale per 256
    assert optimizer_state_bytes_of((4096,), "torchao-fp8", "fp32") == 2 * (4096 + 16 * 4)
    assert optimizer_state_bytes_of((4000, 3), "torchao-fp8", "fp32") == 2 * 4 * 12000
    assert master_bytes((10, 10), "fp8coat", "bf16-remainder") == 200
    assert master_bytes((10, 10), "fp8coat", "bf16-stochastic") == 0


@pytest.mark.parametrize("recipe,cache", [("bf16", True), ("fp8-linear", True), ("coat", True), ("coat", False),
                                          ("fp8-linear", None), ("coat", None)])
def test_fp8_weight_copies_equal_the_caches_after_a_forward(recipe, cache):
    """``cache`` None: the defaults of the recipe and of the planner (no copies)."""
    cfg = _config("llama", 2, layers=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).bfloat16()
    model = fp8coat.convert(model, recipe if cache is None else
                            fp8coat.get_recipe(recipe).with_options(cache_fp8_weights=cache)).train()
    model(input_ids=torch.randint(0, VOCAB, (2, 8)), use_cache=False)
    options = {} if cache is None else {"cache_fp8_weights": cache}
    plan = plan_memory(ModelShape.from_config(cfg), PlanSettings(batch=2, seq=8, recipe=recipe, device="cpu",
                                                                 **options))
    expected = sum(c.nbytes for c in weight_caches(model))
    assert plan.fp8_weight_copies == expected
    assert (expected > 0) == (recipe != "bf16" and bool(cache))


def test_fsdp_shards_params_and_states_and_drops_the_weight_caches():
    one = plan_memory(LLAMA7B, PlanSettings(batch=8, seq=2048, cache_fp8_weights=True))
    four = plan_memory(LLAMA7B, PlanSettings(batch=8, seq=2048, gpus=4, cache_fp8_weights=True))
    assert four.weights == sum(-(-p.shape[0] // 4) * (p.numel // p.shape[0]) * 2 for p in LLAMA7B.parameters())
    assert four.fp8_weight_copies == 0 and one.fp8_weight_copies > 0
    assert four.optimizer_states < one.optimizer_states / 3.9
    assert four.fsdp_gathered > 0 and one.fsdp_gathered == 0
    # two of eight sequences per GPU: a quarter, up to the per-op scalars (fp32 scales, SDPA's int64 seed/offset)
    assert 0 < four.layer_activations * 4 - one.layer_activations < 1024


# ---------------------------------------------------------------------------------------------------------------
# phases, max_batch, settings


def test_peak_grows_with_the_batch_and_max_batch_is_the_largest_that_fits():
    settings = PlanSettings(batch=1, seq=2048, recipe="coat")
    peaks = [plan_memory(LLAMA7B, PlanSettings(batch=b, seq=2048)).peak for b in range(1, 12)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    gib = 100.0
    best = max_batch(LLAMA7B, settings, gib)
    assert best > 0
    assert plan_memory(LLAMA7B, PlanSettings(batch=best, seq=2048)).peak <= gib * GIB
    assert plan_memory(LLAMA7B, PlanSettings(batch=best + 1, seq=2048)).peak > gib * GIB
    assert max_batch(LLAMA7B, settings, 60.0) <= best <= max_batch(LLAMA7B, settings, 139.0)
    assert max_batch(LLAMA7B, settings, 10.0) == 0
    sharded = max_batch(LLAMA7B, PlanSettings(batch=2, seq=2048, gpus=2), gib)
    assert sharded % 2 == 0 and sharded > best


def test_step_in_backward_holds_no_gradients_and_lowers_the_peak():
    usual = plan_memory(LLAMA7B, PlanSettings(batch=4, seq=2048))
    sib = plan_memory(LLAMA7B, PlanSettings(batch=4, seq=2048, step_in_backward=True))
    assert sib.gradients == 0 and usual.gradients == LLAMA7B.n_params * 2
    assert "optimizer" not in sib.phases and sib.peak < usual.peak
    accum = plan_memory(LLAMA7B, PlanSettings(batch=4, seq=2048, step_in_backward=True, grad_accum=2))
    assert accum.gradients == usual.gradients  # held across micro-batches


def test_table_and_dict():
    plan = plan_memory(LLAMA7B, PlanSettings(batch=16, seq=2048))
    table = plan.table()
    for line in ("weights", "gradients", "master weights", "optimizer states", "fp8 weight copies",
                 "activations saved for backward", "logits / loss", "FSDP gathered", "workspace", "**peak**"):
        assert line in table
    d = json.loads(plan.to_json())
    assert d["peak_bytes"] == plan.peak and d["bytes"]["weights"] == plan.weights
    assert d["settings"]["batch"] == 16 and d["model"]["hidden"] == 4096


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch=0), "batch"), (dict(recipe="fp4"), "unknown recipe"), (dict(optimizer="sgd"), "unknown optimizer"),
    (dict(optimizer="torch", step_in_backward=True), "step-in-backward"), (dict(batch=3, gpus=2), "multiple"),
    (dict(optimizer="torch", master_weights="bf16-remainder"), "fp8coat"), (dict(device="tpu"), "device"),
    (dict(seq=-1), "seq"), (dict(grad_accum=0), "grad_accum"),
])
def test_invalid_settings_raise(kwargs, message):
    args = dict(batch=4, seq=128) | kwargs
    with pytest.raises(ValueError, match=message):
        PlanSettings(**args)


def test_unsupported_model_type_raises():
    with pytest.raises(ValueError, match="gpt2"):
        ModelShape.from_config({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 4,
                                "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 10})


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_text_json_max_batch_and_config_paths(tmp_path, capsys):
    assert main(["plan", "--model", "llama2-7b", "--recipe", "coat", "--batch-size", "16", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "**peak**" in out
    assert main(["plan", "--model", "llama2-7b", "--recipe", "bf16", "--optimizer", "torch", "--batch-size", "3",
                 "--seq-len", "2048", "--no-chunked-loss", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["param_dtype"] == "fp32" and d["settings"]["chunked_loss"] is False
    expected = plan_memory(LLAMA7B, PlanSettings(batch=3, seq=2048, recipe="bf16", optimizer="torch",
                                                 chunked_loss=False)).peak
    assert d["peak_bytes"] == expected
    assert main(["plan", "--model", "llama2-7b", "--max-batch", "--memory-gib", "80", "--step-in-backward"]) == 0
    best = max_batch(LLAMA7B, PlanSettings(batch=1, seq=2048, step_in_backward=True), 80)
    assert capsys.readouterr().out.strip().endswith(f": {best}")
    assert main(["plan", "--model", "llama2-7b", "--batch-size", "8", "--fp8-attention", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"]["fp8_attention"] is True
    assert d["peak_bytes"] == plan_memory(LLAMA7B, PlanSettings(batch=8, seq=2048, fp8_attention=True)).peak
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = _config("qwen3", 2, layers=3).to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    for model in (str(folder), str(folder / "config.json")):
        assert main(["plan", "--model", model, "--batch-size", "2", "--seq-len", "16", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["model"]["qk_norm"] is True and d["model"]["layers"] == 3 and d["model"]["head_dim"] == 32


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "gpt2.json"
    bad.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    for argv, message in [
        (["--model", str(bad)], "model_type 'gpt2'"), (["--batch-size", "0"], "batch must be"),
        (["--recipe", "fp4"], "unknown recipe"), (["--model", str(tmp_path / "none")], "unknown model"),
        (["--max-batch", "--memory-gib", "0"], "memory must be"),
        (["--recipe", "bf16", "--fp8-attention"], "fp8_attention is an option of the coat recipe"),
    ]:
        assert main(["plan", *argv]) == 2
        assert message in capsys.readouterr().err


def test_plan_check_reads_the_7b_benchmark_rows(tmp_path):
    """``benchmarks.plan_check`` on rows shaped like ``benchmarks.llama7b``'s: torchao float8 rows are left out (not
    modeled), a row is planned with the FP8 weight cache it recorded (one without the key, from before the cache was
    off by default: with it), an out-of-memory row is listed unmeasured."""
    from benchmarks import plan_check

    base = {"recipe": "coat", "optimizer": "fp8coat", "master_weights": "bf16-remainder", "step_in_backward": False,
            "chunked_loss": True, "compiled": True, "batch": 16, "seq": 2048, "layers": 32, "oom": False}
    rows = [dict(base, row="fp8coat_exact_cache", cache_fp8_weights=True, peak_gib=120.0),
            dict(base, row="fp8coat_exact", cache_fp8_weights=False, peak_gib=114.0),
            dict(base, row="fp8coat_exact_cache", batch=24, cache_fp8_weights=True, oom=True, peak_gib=None),
            dict(base, row="torchao_fp8_compiled_adamwfp8", recipe="torchao-float8", optimizer="torchao-fp8",
                 master_weights="fp32", peak_gib=94.2),
            dict(base, row="fp8coat_exact_old", peak_gib=120.0)]
    path = tmp_path / "llama7b.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    table, off = plan_check.check([str(path)])
    lines = [line for line in table.splitlines() if "llama7b.json" in line]
    assert len(lines) == 4 and not any("torchao" in line for line in lines)
    planned = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in lines}
    cached = planned["llama7b.json #0 fp8coat_exact_cache/fp8coat b16"]
    uncached = planned["llama7b.json #1 fp8coat_exact/fp8coat b16"]
    assert cached - uncached > 5.5  # Llama-2-7B's decoder-layer weights: 6.0 GiB of E4M3 copies
    assert planned["llama7b.json #4 fp8coat_exact_old/fp8coat b16"] == cached
    assert "| oom |" in lines[2]
    measured = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in lines}
    assert float(measured["llama7b.json #0 fp8coat_exact_cache/fp8coat b16"]) == pytest.approx(120.0)


def test_plan_check_reads_the_cache_of_bench_layers_model4_rows(tmp_path):
    """bench_layers' 4-layer rows record ``cache_fp8_weights``; files written before they did ran with the cache."""
    from benchmarks import plan_check

    cfg = {"hidden": 4096, "heads": 32, "ffn": 11008, "layers": 4, "vocab": 32000, "batch": 4, "seq": 2048}
    row = {"param_dtype": "bfloat16", "optimizer": "AdamW", "compiled": True, "chunked_loss": True,
           "step_in_backward": False, "peak_GiB": 12.3}
    model4 = {"fp8coat_coat_compiled": row, "fp8coat_coat_compiled_cached": dict(row, cache_fp8_weights=True),
              "fp8coat_coat_compiled_uncached": dict(row, cache_fp8_weights=False)}
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"config": cfg, "rows": {"model4": model4, "layer": {}}}))
    lines = [line for line in plan_check.check([str(path)])[0].splitlines() if "layers.json" in line]
    planned = {line.split("|")[1].strip().split("/")[1]: float(line.split("|")[2]) for line in lines}
    assert planned["fp8coat_coat_compiled"] == planned["fp8coat_coat_compiled_cached"]
    # 4 layers of Llama-2-7B linear weights, 1 byte each (+ 20 B per weight)
    copies = 4 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 7 * 20) / 2**30
    assert planned["fp8coat_coat_compiled"] - planned["fp8coat_coat_compiled_uncached"] == pytest.approx(copies,
                                                                                                         abs=2e-3)


def test_plan_check_takes_memory_left_by_earlier_runs_off_the_peak(tmp_path):
    from benchmarks import plan_check

    row = {"row": "fp8coat_best", "recipe": "coat", "optimizer": "fp8coat", "master_weights": "bf16-stochastic",
           "step_in_backward": True, "chunked_loss": True, "compiled": True, "batch": 8, "seq": 2048, "layers": 32,
           "oom": False, "peak_gib": 73.29}
    path = tmp_path / "llama7b.json"
    path.write_text(json.dumps({"rows": [row, dict(row, allocated_before_gib=3.25)]}))
    lines = [line for line in plan_check.check([str(path)])[0].splitlines() if "llama7b.json" in line]
    assert [float(line.split("|")[3]) for line in lines] == pytest.approx([73.29, 70.04])
