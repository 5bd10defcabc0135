"""fp8coat.compile_layers: Module.compile's behaviour, with compiled code of its own per layer.

The dynamo "eager" backend keeps these quick; the converted-model case (every layer compiled, one variant each,
more layers than dynamo's default limit) is in ``test_train.py``.
"""

import copy
import io

import torch

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
    assert float(copied[0](x).abs().sum()) == 0.0
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


def test_each_layer_gets_its_own_code_object():
    layers = _layers(3)
    compile_layers(layers, backend="eager")
    codes = {id(layer._compiled_call_impl._torchdynamo_orig_callable.__code__) for layer in layers}
    assert len(codes) == 3


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
