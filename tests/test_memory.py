"""Activation memory: bytes saved for backward by one Llama decoder layer, counted exactly (unique storages)."""

from __future__ import annotations

import copy

import pytest
import torch

import fp8coat
from fp8coat.memory import measure_saved_tensors

transformers = pytest.importorskip("transformers")

B, S, H, HEADS, INTER = 2, 128, 256, 4, 688  # Llama-2 proportions: MHA, intermediate = 2.6875 · hidden
U = B * S * H * 2  # bytes of one bf16 activation of hidden size


def _layer_and_inputs():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=H, intermediate_size=INTER, num_hidden_layers=1,
                                   num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=S)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).bfloat16()  # pure BF16: params and activations, no autocast
    x = torch.randn(B, S, H, dtype=torch.bfloat16, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(S)[None])
    return model, x, pos


def _saved(model, x, pos):
    layer = model.model.layers[0]
    layer.train()
    out, report = measure_saved_tensors(lambda: layer(x, position_embeddings=pos), modules=layer)
    out.float().sum().backward()  # the graph is intact
    return report


def test_coat_layer_saves_at_most_045_of_bf16():
    model, x, pos = _layer_and_inputs()
    bf16 = _saved(model, x, pos)
    reports = {"bf16": bf16}
    for recipe in ("fp8-linear", "coat"):
        converted = fp8coat.convert(copy.deepcopy(model), recipe)
        reports[recipe] = _saved(converted, x, pos)
    for name, rep in reports.items():
        print(f"\n{name}: {rep.total_bytes / U:.2f} U saved for backward (U = {U} bytes), parameters apart")
        print(rep.table(U))
    ratio = reports["coat"].total_bytes / bf16.total_bytes
    fp8_linear = reports["fp8-linear"].total_bytes / bf16.total_bytes
    print(f"\ncoat / bf16 = {ratio:.3f}; fp8-linear / bf16 = {fp8_linear:.3f}")
    assert ratio <= 0.45
    assert reports["fp8-linear"].total_bytes < bf16.total_bytes
    # what coat saves: FP8 inputs of norms/SwiGLU/linears + the attention core's own BF16 tensors, nothing else
    allowed = {torch.float8_e4m3fn, torch.float32}
    bf16_entries = [e for e in reports["coat"].entries if e[2] == torch.bfloat16]
    assert all(e[0].startswith(("ScaledDotProduct", "Mul", "Neg", "Cat", "Slice")) for e in bf16_entries), bf16_entries
    assert {e[2] for e in reports["coat"].entries} <= allowed | {torch.bfloat16}


def test_measure_counts_unique_storages_and_separates_parameters():
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(8, 32, requires_grad=True)

    def fwd():
        y = lin(x)
        return (y * y).sum() + (y[:4] * y[2:6]).sum() + (x * x).sum()

    _, rep = measure_saved_tensors(fwd, modules=lin)
    # y saved once (its views too), x once (by addmm and the mul): 2 storages
    assert rep.total_bytes == 8 * 32 * 4 * 2
    assert rep.parameter_bytes == 32 * 32 * 4  # the weight, saved by addmm, reported apart


@pytest.mark.parametrize("recipe", ["bf16", "coat"])
def test_measured_gradients_equal_unmeasured(recipe):
    """Gradients through a measured graph equal those of an unmeasured forward, bit for bit."""
    model, x, pos = _layer_and_inputs()
    if recipe != "bf16":
        fp8coat.convert(model, recipe=recipe)
    layer = model.model.layers[0]
    layer.train()
    grads = []
    for measured in (False, True):
        layer.zero_grad()
        x.grad = None
        fwd = (lambda: layer(x, position_embeddings=pos))
        out = measure_saved_tensors(fwd, modules=layer)[0] if measured else fwd()
        out.float().square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_measuring_leaves_nothing_alive():
    """Dropping the output frees the measured graph: a tensor that its op saves as an output (exp's, sigmoid's)
    holds its own ``grad_fn``, so holding it in the measurement would make a cycle that keeps the graph alive."""
    import gc
    import weakref

    x = torch.randn(64, 64, requires_grad=True)
    refs = []

    def fwd():
        y = torch.exp(x)
        z = torch.sigmoid(y)
        refs.extend([weakref.ref(y), weakref.ref(z)])
        return (y * z).sum()

    out, report = measure_saved_tensors(fwd)
    assert report.total_bytes > 0
    del out
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_checkpointed_regions_count_their_inputs_and_measuring_does_not_recompute_them():
    """A non-reentrant checkpoint keeps its inputs and recomputes the rest in backward: that is what is counted
    (read as packed: measuring neither runs the recomputation nor counts its tensors)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    x = torch.randn(8, 32, requires_grad=True)
    calls = []

    def block(h):
        calls.append(1)
        return lin2(torch.tanh(lin1(h)))

    _, plain = measure_saved_tensors(lambda: block(x + 1).sum(), modules=[lin1, lin2])
    assert plain.total_bytes == 8 * 32 * 4 * 2  # lin1's input and tanh's output (lin2 saves tanh's output too)
    want = torch.autograd.grad(block(x + 1).sum(), [x, lin1.weight])
    calls.clear()
    out, rep = measure_saved_tensors(lambda: checkpoint(block, x + 1, use_reentrant=False).sum(), modules=[lin1, lin2])
    assert calls == [1], "measuring ran the recomputation"
    assert rep.by_op == {"Checkpoint (inputs)": 8 * 32 * 4}, rep.by_op  # x + 1, the block's input
    got = torch.autograd.grad(out, [x, lin1.weight])
    assert calls == [1, 1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _sharded_state_bytes(rank: int, world_size: int) -> tuple[int, int]:
    from torch.distributed.fsdp import fully_shard

    from fp8coat.memory import optimizer_state_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 1))  # 5 rows: 3 + 2; 1 row: 1 + 0
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    local = sum(2 * p.to_local().numel() * 4 for p in model.parameters())  # exp_avg + exp_avg_sq, fp32
    return optimizer_state_bytes(opt), local


def test_optimizer_state_bytes_counts_this_ranks_shards_of_dtensor_states():
    from distributed import run_ranks

    results = run_ranks(_sharded_state_bytes, 2)
    for counted, local in results:
        assert counted == local
    assert sum(c for c, _ in results) == 2 * 4 * (8 * 5 + 5 + 5 + 1)


def test_saved_variables_are_read_on_torch_releases_without_unpack():
    """Where ``SavedTensor`` offers neither ``unpack`` nor ``data`` (older torch releases), a node's saved tensors are
    read through its unpacking attributes (``_saved_<x>``; ``saved_tensors`` of Python nodes) instead."""
    from fp8coat.memory.saved import _node_tensors

    class OldSavedTensor:  # what such a release exposes: the hook slot, nothing to read the value with
        unpack_hook = None

    a, b, c = torch.randn(3), torch.randn(4), torch.randn(5)

    class BuiltinNode:
        _raw_saved_self = OldSavedTensor()
        _saved_self = a

    class PythonNode:
        _raw_saved_tensors = (OldSavedTensor(), OldSavedTensor())
        saved_tensors = (b, c)

    assert [t is a for t in _node_tensors(BuiltinNode(), set())[0]] == [True]
    found = _node_tensors(PythonNode(), set())[0]
    assert len(found) == 2 and found[0] is b and found[1] is c
