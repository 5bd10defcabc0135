"""fp8coat.StepInBackward: the optimizer step inside backward equals the usual step exactly, frees every
gradient as soon as it is used, accumulates micro-batches, and refuses what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_bit_equal, device

import fp8coat

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, min_quantized_numel=0)


def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                            torch.nn.Linear(128, 10))
    return m.to(device=device(), dtype=dtype)


def _loss(model, x, y, dtype):
    return torch.nn.functional.cross_entropy(model(x.to(device(), dtype)).float(), y.to(device()))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("master,backend", [("bf16-remainder", "torch"), ("fp32", "torch"),
                                            ("bf16-remainder", "triton")])
def test_equals_the_usual_step_exactly(master, backend):
    dtype = torch.float32 if master == "fp32" else torch.bfloat16
    ref, model = _mlp(dtype), _mlp(dtype)
    kw = dict(HYPER, master_weights=master, backend=backend)
    o_ref = fp8coat.AdamW(ref.parameters(), **kw)
    o = fp8coat.AdamW(model.parameters(), **kw)
    fp8coat.StepInBackward(o)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    live = []
    original = o.step_params

    def spy(params, *, new_step):  # bytes of gradients alive whenever an update runs
        live.append(sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None))
        return original(params, new_step=new_step)

    o.step_params = spy
    for step, (x, y) in enumerate(_batches(4)):
        _loss(ref, x, y, dtype).backward()
        o_ref.step()
        o_ref.zero_grad(set_to_none=True)
        _loss(model, x, y, dtype).backward()
        assert all(p.grad is None for p in model.parameters()), "gradients must be freed in backward"
        o.step()  # finds no gradients: a no-op
        for a, b in zip(ref.parameters(), model.parameters()):
            assert_bit_equal(a.detach(), b.detach(), f"{master} step {step}")
    assert len(live) == 4 * len(list(model.parameters()))
    assert max(live) <= largest, f"{max(live)} bytes of gradients alive at once (largest parameter {largest})"
    assert o._sr_calls == o_ref._sr_calls == 4  # one optimizer step per backward pass
    for a, b in zip(ref.parameters(), model.parameters()):
        for key in o_ref.state[a]:
            assert_bit_equal(torch.as_tensor(o_ref.state[a][key]), torch.as_tensor(o.state[b][key]), key)


def test_accumulating_micro_batches_equals_summed_gradients():
    ref, model = _mlp(torch.bfloat16), _mlp(torch.bfloat16)
    o_ref = fp8coat.AdamW(ref.parameters(), **HYPER)
    o = fp8coat.AdamW(model.parameters(), **HYPER)
    sib = fp8coat.StepInBackward(o)
    batches = _batches(6)
    for i in range(0, 6, 3):
        for x, y in batches[i:i + 3]:
            (_loss(ref, x, y, torch.bfloat16) / 3).backward()
        o_ref.step()
        o_ref.zero_grad(set_to_none=True)
        for j, (x, y) in enumerate(batches[i:i + 3]):
            if j < 2:
                with sib.accumulating():
                    (_loss(model, x, y, torch.bfloat16) / 3).backward()
                assert all(p.grad is not None for p in model.parameters())
            else:
                (_loss(model, x, y, torch.bfloat16) / 3).backward()
        assert all(p.grad is None for p in model.parameters())
    for a, b in zip(ref.parameters(), model.parameters()):
        assert_bit_equal(a.detach(), b.detach())


def test_stochastic_rounding_and_remove():
    model = _mlp(torch.bfloat16)
    o = fp8coat.AdamW(model.parameters(), master_weights="bf16-stochastic", **HYPER)
    sib = fp8coat.StepInBackward(o)
    before = copy.deepcopy(model)
    (x, y), = _batches(1)
    _loss(model, x, y, torch.bfloat16).backward()
    assert all(not torch.equal(a, b) for a, b in zip(before.parameters(), model.parameters()))
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    sib.remove()
    _loss(model, x, y, torch.bfloat16).backward()
    assert all(p.grad is not None for p in model.parameters()), "after remove() gradients are kept again"


def test_errors():
    model = _mlp(torch.float32)
    with pytest.raises(TypeError, match="fp8coat.AdamW"):
        fp8coat.StepInBackward(torch.optim.AdamW(model.parameters()))
    other = fp8coat.AdamW(_mlp(torch.float32).parameters(), **HYPER)
    with pytest.raises(ValueError, match="does not hold"):
        other.step_params([next(model.parameters())], new_step=True)


def test_train_config_refuses_what_step_in_backward_cannot_do():
    from fp8coat.train import TrainConfig  # the application's configuration

    with pytest.raises(ValueError, match="grad-clip 0"):
        TrainConfig(step_in_backward=True).validate()
    with pytest.raises(ValueError, match="fp8coat optimizer"):
        TrainConfig(step_in_backward=True, grad_clip=0.0, optimizer="torch").validate()
    with pytest.raises(ValueError, match="grad-clip must be"):
        TrainConfig(grad_clip=-1.0).validate()


def test_a_backward_pass_that_raises_does_not_swallow_the_next_step():
    """A pass that fails after some updates never runs its end-of-pass callback; the next pass must still start
    a new optimizer step (and join the update stream)."""
    model = _mlp(torch.bfloat16)
    o = fp8coat.AdamW(model.parameters(), **HYPER)
    sib = fp8coat.StepInBackward(o)
    (x, y), = _batches(1)
    xin = x.to(device(), torch.bfloat16).requires_grad_()

    def boom(grad):
        raise RuntimeError("boom")

    xin.register_hook(boom)
    out = torch.nn.functional.cross_entropy(model(xin).float(), y.to(device()))
    with pytest.raises(RuntimeError, match="boom"):
        out.backward()
    assert o._sr_calls == 1  # the failed pass had started a step (the last layer was updated)
    sib.wait()
    for p in model.parameters():
        p.grad = None
    _loss(model, x, y, torch.bfloat16).backward()
    assert o._sr_calls == 2, "the next pass is a new optimizer step"
    assert all(p.grad is None for p in model.parameters())
    sib.remove()
