"""The FP8 weight cache (``Recipe.cache_fp8_weights=True``; off by default): any change of a weight is seen by the
next forward; unchanged weights are not quantized again (gradient accumulation). Content fingerprints: Triton kernel
(interpreter on the CPU) == torch reference."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import adversarial, assert_bit_equal, device

import fp8coat
from fp8coat.ops.linear import linear, linears
from fp8coat.ops.weight_cache import FP8WeightCache
from fp8coat.quantization import (
    quantize_if,
    quantize_per_tensor,
    quantize_transpose,
    refresh_tensor_scale,
    tensor_fingerprint,
)

BACKENDS = ["torch", "triton"]


def _cached(recipe: str) -> fp8coat.Recipe:
    """``recipe`` with the FP8 weight cache on (the models of this file test the cache)."""
    return fp8coat.get_recipe(recipe).with_options(cache_fp8_weights=True)


def _fresh(x: torch.Tensor, backend: str):
    record = torch.zeros(4, dtype=torch.int32, device=x.device)
    cached = torch.zeros((), dtype=torch.float32, device=x.device)
    return record, cached, refresh_tensor_scale(x, "e4m3", record, cached, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# fingerprint primitives: kernel == reference, sensitivity


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (33, 64)), (torch.bfloat16, (3, 5)),
                                         (torch.float16, (64, 40)), (torch.float32, (7, 9)),
                                         (torch.bfloat16, (4096 + 3,)), (torch.bfloat16, (0, 8))])
def test_refresh_kernel_matches_reference(dtype, shape):
    """Scale, fingerprint lanes and the changed flag, bit for bit, on adversarial values (NaN, inf, zeros, tiny,
    huge), odd sizes (16-bit words) and a non-contiguous view, over a sequence unchanged -> changed -> same."""
    x = adversarial(shape, seed=3).to(dtype) if 0 not in shape else torch.empty(shape, dtype=dtype)
    x = x.to(device())
    views = [x] + ([x.t()] if x.dim() == 2 else [])
    for v in views:
        states = {}
        for backend in BACKENDS:
            record, cached, s1 = _fresh(v, backend)
            first = record.clone()
            s2 = refresh_tensor_scale(v, "e4m3", record, cached, backend=backend)
            second = record.clone()
            w = v.clone(memory_format=torch.contiguous_format)
            if w.numel():
                w.view(-1)[w.numel() // 2] = 0.5 if w.view(-1)[w.numel() // 2] != 0.5 else 0.25
            s3 = refresh_tensor_scale(w, "e4m3", record, cached, backend=backend)
            states[backend] = (first, second, record.clone(), s1, s2, s3, cached.clone())
        for a, b in zip(states["torch"], states["triton"]):
            assert_bit_equal(a, b, f"{dtype} {tuple(v.shape)}")
        first, second, third = states["torch"][:3]
        assert first[2:].tolist() == [1, 1] and second[3] == 0
        assert third[3] == (1 if v.numel() else 0)
        assert_bit_equal(states["torch"][3], quantize_per_tensor(v, "e4m3", backend="torch")[1])


def test_fingerprint_sees_every_single_bit_and_common_edits():
    """Each of 16 bit positions of several elements, sign flips of two elements of opposite sign, swaps, zeroing,
    ±0, scaling by -1: every edit changes the fingerprint (lane 0 is a sum of a bijection of each word)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 40, generator=g).bfloat16()
    base = tensor_fingerprint(x)
    edits = []
    bits = x.view(torch.int16)
    for idx in (0, 1, 477, 959):
        for bit in range(16):
            y = bits.clone()
            y.view(-1)[idx] ^= (1 << bit) if bit < 15 else -(1 << 15)
            edits.append(y.view(torch.bfloat16))
    pos = int((x.view(-1) > 0).nonzero()[0])
    neg = int((x.view(-1) < 0).nonzero()[0])
    y = x.clone()
    y.view(-1)[[pos, neg]] *= -1
    edits.append(y)
    y = x.clone()
    y.view(-1)[[3, 7]] = x.view(-1)[[7, 3]]
    edits.append(y)
    edits += [x * 0, -x, x.t().contiguous().t()]
    z = torch.zeros(8, 8, dtype=torch.bfloat16)
    assert not torch.equal(tensor_fingerprint(z), tensor_fingerprint(-z))  # -0.0 has other bytes than 0.0
    for i, y in enumerate(edits):
        if torch.equal(y.view(torch.int16), x.view(torch.int16)):
            continue  # (the transposed round trip is the same tensor)
        assert not torch.equal(tensor_fingerprint(y), base), f"edit {i} not seen"


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_if_writes_only_when_flagged(backend):
    dev = device()
    x = torch.randn(40, 48, device=dev).bfloat16()
    scale = torch.tensor(0.01, device=dev)
    want, _ = quantize_per_tensor(x, "e4m3", scale, backend="torch")
    out = torch.full((40, 48), 3.0, device=dev).to(torch.float8_e4m3fn)
    poison = out.clone()
    quantize_if(x, "e4m3", scale, out, torch.zeros(1, dtype=torch.int32, device=dev), backend=backend)
    assert_bit_equal(out, poison)
    quantize_if(x, "e4m3", scale, out, torch.ones(1, dtype=torch.int32, device=dev), backend=backend)
    assert_bit_equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (4096, 4096)), (torch.bfloat16, (11008, 4096)),
                                         (torch.float32, (4096, 1024)), (torch.bfloat16, (4097, 33))])
def test_refresh_kernel_matches_reference_at_real_shapes(dtype, shape):
    x = (torch.randn(shape, device="cuda") * 0.02).to(dtype)
    x.view(-1)[12345 % x.numel()] = 7.0
    for edit in (None, 0, x.numel() - 1):
        if edit is not None:
            x.view(-1)[edit] = -x.view(-1)[edit] - 1.0
        results = []
        for backend in BACKENDS:
            record = torch.zeros(4, dtype=torch.int32, device="cuda")
            cached = torch.zeros((), device="cuda")
            s = refresh_tensor_scale(x, "e4m3", record, cached, backend=backend)
            results.append((s, record.clone()))
        assert_bit_equal(results[0][0], results[1][0])
        assert_bit_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("bad", [torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(float("inf")),
                                 torch.tensor(float("nan")), torch.tensor(1e-40),
                                 torch.tensor(1e-300, dtype=torch.float64), torch.tensor(1e39, dtype=torch.float64)])
def test_quantize_per_tensor_rejects_bad_scales(bad):
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="positive finite"):
        quantize_per_tensor(x, "e4m3", bad)
    with pytest.raises(ValueError, match="one-element"):
        quantize_per_tensor(x, "e4m3", torch.ones(2))
    with pytest.raises(ValueError, match="one-element"):
        quantize_transpose(x, "e4m3", 0.5)


def test_triton_backend_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        quantize_per_tensor(torch.randn(4, 4), "e4m3", backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# the cache in a layer


def _layers(n_out=48, k=64, bias=True, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList([torch.nn.Linear(k, n_out, bias=bias)])
    return fp8coat.convert(m.to(device()).bfloat16(), _cached("fp8-linear")).train()


def _uncached(layer, x):
    return linear(x, layer.weight, layer.bias, None)


def _edit_data_mul(p, new):
    p.data.mul_(0).add_(new)


def _edit_data_copy(p, new):
    p.data.copy_(new)


def _edit_assign_data(p, new):
    p.data = new.clone()


def _edit_copy_no_grad(p, new):
    with torch.no_grad():
        p.copy_(new)


def _edit_set(p, new):
    with torch.no_grad():
        p.set_(new.clone())


def _edit_detach(p, new):
    p.detach().copy_(new)


def _edit_load_state_dict(p, new, layer):
    sd = layer.state_dict()
    sd["weight"] = new
    layer.load_state_dict(sd)


EDITS = {"data.mul_": _edit_data_mul, "data.copy_": _edit_data_copy, "data =": _edit_assign_data,
         "copy_ under no_grad": _edit_copy_no_grad, "set_": _edit_set, "detach().copy_": _edit_detach}


@pytest.mark.parametrize("how", list(EDITS) + ["load_state_dict"])
def test_every_way_of_changing_a_weight_is_seen(how):
    model = _layers()
    layer = model.layers[0]
    x = torch.randn(16, 64, device=device(), dtype=torch.bfloat16)
    layer(x)  # the cache holds the FP8 copy of the current weight
    new = torch.randn_like(layer.weight) * 0.05
    if how == "load_state_dict":
        _edit_load_state_dict(layer.weight, new, layer)
    else:
        EDITS[how](layer.weight, new)
    got = layer(x)
    assert_bit_equal(got, _uncached(layer, x), how)
    assert torch.equal(layer.weight, new.to(layer.weight.dtype))


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False), lambda ps: fp8coat.AdamW(ps, lr=0.01),
    lambda ps: fp8coat.AdamW(ps, lr=0.01, backend="triton"),
], ids=["sgd", "adamw-foreach", "adamw-loop", "fp8coat", "fp8coat-triton"])
def test_optimizer_steps_are_seen(make_opt):
    model = _layers()
    layer = model.layers[0]
    opt = make_opt(list(model.parameters()))
    x = torch.randn(16, 64, device=device(), dtype=torch.bfloat16)
    for _ in range(3):
        layer(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert_bit_equal(layer(x), _uncached(layer, x))


def test_manual_sgd_through_data_trains_like_the_reference():
    """SGD written as ``p.data.add_(-lr * p.grad)`` (no version bump): every step must see the new weights, so the
    converted model's losses track an emulation that quantizes the current weights at every call."""
    model = _layers(n_out=32)
    layer = model.layers[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=g).bfloat16().to(device())
    target = torch.randn(64, 32, generator=g).bfloat16().to(device())
    ref_w, ref_b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    losses, ref_losses = [], []
    for _ in range(15):
        loss = (layer(x).float() - target.float()).square().mean()
        loss.backward()
        for p in layer.parameters():
            p.data.add_(p.grad, alpha=-0.5)
            p.grad = None
        ref = (linear(x, ref_w, ref_b, None).float() - target.float()).square().mean()
        ref.backward()
        with torch.no_grad():
            for p in (ref_w, ref_b):
                p.add_(p.grad, alpha=-0.5)
                p.grad = None
        losses.append(loss.item())
        ref_losses.append(ref.item())
    assert losses == ref_losses
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_quantizes_each_weight_once(backend, monkeypatch):
    """Micro-batches between two weight updates reuse the FP8 copy: the quantization runs only when the weight
    changed (seen by poisoning the cached copy: a second quantization would overwrite it)."""
    import fp8coat.ops.weight_cache as wc

    monkeypatch.setattr(wc, "refresh_tensor_scale",
                        lambda *a, **k: refresh_tensor_scale(*a, **k, backend=backend))
    monkeypatch.setattr(wc, "quantize_if", lambda *a, **k: quantize_if(*a, **k, backend=backend))
    model = _layers()
    layer = model.layers[0]
    cache = layer._fp8coat_cache
    x = torch.randn(16, 64, device=device(), dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        for micro in range(3):
            layer(x).float().sum().backward()
            assert int(cache.refreshed) == (1 if micro == 0 else 0)
            if micro == 0:
                good = cache.q.clone()
                cache.q.view(torch.uint8).fill_(0x7E)  # poison: a re-quantization would restore it
        assert (cache.q.view(torch.uint8) == 0x7E).all()
        cache.q.copy_(good)
        opt.step()
        opt.zero_grad()
    layer.weight.data.mul_(0.5)
    layer(x)
    assert int(cache.refreshed) == 1


def test_fingerprint_lets_the_fused_multi_layer_path_see_data_edits():
    """q/k/v-style layers sharing one quantized input (one custom-op call) each see their own weight's edits."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 64, generator=g).bfloat16().to(device())
    ws = [torch.randn(n, 64, generator=g).bfloat16().to(device()).requires_grad_() for n in (64, 32, 32)]
    caches = [FP8WeightCache() for _ in ws]
    linears(x, ws, caches=caches)
    ws[1].data.zero_()
    got = linears(x, ws, caches=caches)
    want = linears(x, ws)
    for a, b in zip(got, want):
        assert_bit_equal(a, b)
    assert float(got[1].detach().abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# whole models


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).bfloat16()


def test_zeroing_converted_linears_through_data_changes_training_logits():
    model = fp8coat.convert(_tiny_llama(), _cached("coat")).train()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    from fp8coat.nn.linear import FP8LinearMixin

    for m in model.modules():
        if isinstance(m, FP8LinearMixin):
            m.weight.data.mul_(0)
    after = model(input_ids=ids).logits
    fresh = fp8coat.convert(fp8coat.unconvert(copy.deepcopy(model)), "coat").train()  # quantizes in every forward
    assert not torch.equal(before, after)
    assert_bit_equal(after, fresh(input_ids=ids).logits)


def test_converted_model_pickles_and_keeps_computing():
    model = fp8coat.convert(_tiny_llama(), _cached("coat")).train()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).logits
    for dump in (lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load):
        copied = dump(model)
        assert_bit_equal(copied(input_ids=ids).logits, want)
        cache = copied.model.layers[0].self_attn.q_proj._fp8coat_cache
        assert cache is not model.model.layers[0].self_attn.q_proj._fp8coat_cache
        assert cache.q.data_ptr() != model.model.layers[0].self_attn.q_proj._fp8coat_cache.q.data_ptr()
        for p in copied.parameters():
            p.data.mul_(0.5)  # the copy's caches belong to the copy
        assert_bit_equal(model(input_ids=ids).logits, want)


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_force_refreshes_an_unchanged_tensor(backend):
    x = torch.randn(40, 48, device=device()).bfloat16()
    record, cached, _ = _fresh(x, backend)
    refresh_tensor_scale(x, "e4m3", record, cached, backend=backend)
    assert int(record[3]) == 0
    cached.fill_(123.0)
    s = refresh_tensor_scale(x, "e4m3", record, cached, True, backend=backend)
    assert int(record[3]) == 1
    assert_bit_equal(s, quantize_per_tensor(x, "e4m3", backend="torch")[1])
    assert_bit_equal(cached, s)


def test_clear_makes_the_next_forward_quantize_again():
    model = _layers()
    layer = model.layers[0]
    cache = layer._fp8coat_cache
    x = torch.randn(16, 64, device=device(), dtype=torch.bfloat16)
    layer(x)
    layer(x)
    assert int(cache.refreshed) == 0
    cache.clear()
    layer(x)
    assert int(cache.refreshed) == 1
    layer(x)
    assert int(cache.refreshed) == 0
    cache.release()
    assert cache.q is None and cache.nbytes == 0
    assert_bit_equal(layer(x), _uncached(layer, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_scales_come_back_as_0d_float32(backend):
    x = torch.randn(4, 8, device=device())
    for scale in (torch.tensor([[0.5]], dtype=torch.float16, device=device()), torch.tensor(0.25, device=device())):
        q, s = quantize_per_tensor(x, "e4m3", scale, backend=backend)
        assert s.dtype == torch.float32 and s.shape == () and float(s) == float(scale)
        assert_bit_equal(q, quantize_per_tensor(x, "e4m3", scale.float().reshape(()), backend="torch")[0])
