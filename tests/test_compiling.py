"""fp8coat.compile_layers: Module.compile on each layer; converted decoder layers share one compiled code.

The dynamo "eager" / "aot_eager" backends keep these quick (the custom ops run the same implementations as in
eager mode, so compiled results are bit-equal).
"""

import copy
import io

import pytest
import torch
from helpers import assert_bit_equal

import fp8coat
from fp8coat.compiling import compile_layers, decoder_layers, is_compiled


def _layers(n: int = 2) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(n)])


def test_outputs_hooks_and_state_dict_unchanged():
    layers = _layers()
    x = torch.randn(2, 4)
    want = [layer(x) for layer in layers]
    keys = set(layers.state_dict())
    seen = []
    layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert compile_layers(layers, backend="eager") == 2 and all(is_compiled(layer) for layer in layers)
    for layer, w in zip(layers, want):
        torch.testing.assert_close(layer(x), w, rtol=0, atol=0)
    assert seen == [(2, 4)] and set(layers.state_dict()) == keys


def test_deepcopy_and_pickle_hold_uncompiled_correct_layers():
    """A copy must compute with its own parameters (a compiled function closed over the original would not)."""
    layers = _layers()
    compile_layers(layers, backend="eager")
    x = torch.randn(2, 4)
    original = layers[0](x)
    copied = copy.deepcopy(layers)
    with torch.no_grad():
        copied[0].weight.zero_()
        copied[0].bias.zero_()
    assert float(copied[0](x).detach().abs().sum()) == 0.0
    torch.testing.assert_close(layers[0](x), original, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layers, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded[0](x), original, rtol=0, atol=0)


def test_forward_installed_on_the_instance_is_honoured():
    """Libraries (e.g. accelerate's device hooks) replace ``forward`` on the instance; the compiled call uses it."""
    layers = _layers(1)
    calls = []
    inner = layers[0].forward

    def wrapped(x):
        calls.append(1)
        return inner(x) * 2

    layers[0].forward = wrapped
    compile_layers(layers, backend="eager")
    x = torch.randn(2, 4)
    torch.testing.assert_close(layers[0](x), inner(x) * 2)
    assert calls == [1]


def _tiny_llama(n_layers: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=n_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).bfloat16()


def _compiled_steps(recipe: str, n_layers: int, compiled: bool, cache: bool):
    """Losses and gradients of 3 training steps (SGD between them) and the number of graphs dynamo compiled;
    ``cache``: ``Recipe.cache_fp8_weights``."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = fp8coat.convert(_tiny_llama(n_layers), fp8coat.get_recipe(recipe).with_options(cache_fp8_weights=cache))
    model.train()
    torch._dynamo.reset()
    counters.clear()
    if compiled:
        compile_layers(decoder_layers(model), backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for _ in range(3):
        for _ in range(2):  # gradient accumulation: with the cache the second forward reuses the FP8 weight copies
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return losses, grads, graphs


@pytest.mark.parametrize("recipe,cache", [("fp8-linear", True), ("coat", True), ("coat", False)])
def test_converted_layers_share_one_compiled_code(recipe, cache):
    """Every decoder layer reuses the first layer's compiled code: as many graphs for 6 layers as for 2 (more than
    dynamo's limit of 8 variants per code object if each layer needed its own), and the compiled training steps
    (with the FP8 weight cache: refreshed after each optimizer step; without: weights quantized in every forward)
    equal the eager ones bit for bit."""
    _, _, graphs_2 = _compiled_steps(recipe, 2, True, cache)
    losses, grads, graphs_6 = _compiled_steps(recipe, 6, True, cache)
    assert graphs_6 == graphs_2 <= 3, (graphs_2, graphs_6)
    want_losses, want_grads, _ = _compiled_steps(recipe, 6, False, cache)
    for a, b in zip(losses, want_losses):
        assert_bit_equal(a, b)
    for ga, gb in zip(grads, want_grads):
        for a, b in zip(ga, gb):
            assert_bit_equal(a, b)


def test_decoder_layers_finds_hf_style_layers():
    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = _layers()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()

    m = Model()
    assert decoder_layers(m) is m.model.layers
    assert decoder_layers(m.model) is m.model.layers
    assert decoder_layers(torch.nn.Linear(2, 2)) is None
