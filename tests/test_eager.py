"""The eager path of the custom ops (``fp8coat.ops.eager``) gives the same outputs, saved tensors and gradients
as the registered ``torch.library`` ops, and handles outputs that do not reach the loss."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bit_equal, device

from fp8coat.ops import activations as A
from fp8coat.ops import eager
from fp8coat.ops import linear as L
from fp8coat.ops import norms as N


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*leaves)
    out = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape)).sum()
               for o in out if o.is_floating_point() and o.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)
               and o.requires_grad)
    loss.backward()
    return [o.detach() for o in out], saved, [t.grad for t in leaves]


CASES = {
    "rmsnorm": (lambda x, w: N.rmsnorm_with_saved(x, w, 1e-6, 16)[:1], lambda: [torch.randn(6, 40), torch.randn(40)]),
    "layernorm": (lambda x, w, b: N.layernorm(x, w, b, 1e-5, 16), lambda: [torch.randn(6, 40), torch.randn(40),
                                                                        torch.randn(40)]),
    "swiglu": (lambda g, u: A.swiglu_with_saved(g, u, 16)[:1], lambda: [torch.randn(6, 48), torch.randn(6, 48)]),
    "gelu": (lambda x: A.gelu(x, "tanh", 16), lambda: [torch.randn(6, 48)]),
    "silu": (lambda x: A.silu(x, 16), lambda: [torch.randn(6, 48)]),
    "linears": (lambda x, w1, w2, b: L.linears(x, [w1, w2], [b, None]),
                lambda: [torch.randn(5, 32), torch.randn(48, 32), torch.randn(16, 32), torch.randn(48)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_path_equals_registered_op(name, monkeypatch):
    fn, make = CASES[name]
    torch.manual_seed(0)
    inputs = [t.to(device(), torch.bfloat16) for t in make()]
    out_e, saved_e, grads_e = _grads(fn, inputs)
    monkeypatch.setattr(eager, "_PLAIN", ())  # every call takes the registered custom op
    out_o, saved_o, grads_o = _grads(fn, inputs)
    assert len(saved_e) == len(saved_o), name
    for a, b in zip(out_e + saved_e + grads_e, out_o + saved_o + grads_o):
        assert_bit_equal(a, b, name)


def test_outputs_that_do_not_reach_the_loss():
    torch.manual_seed(1)
    x = torch.randn(4, 32, dtype=torch.bfloat16, device=device(), requires_grad=True)
    w1 = torch.randn(16, 32, dtype=torch.bfloat16, device=device(), requires_grad=True)
    w2 = torch.randn(16, 32, dtype=torch.bfloat16, device=device(), requires_grad=True)
    y1, y2 = L.linears(x, [w1, w2])
    y1.float().sum().backward()  # y2 unused: its weight gets a zero gradient, x the gradient through w1 only
    assert w2.grad is None or not w2.grad.any()
    assert x.grad is not None and x.grad.abs().sum() > 0
    g = torch.randn(4, 32, dtype=torch.bfloat16, device=device(), requires_grad=True)
    out = N.rmsnorm_with_saved(g, None, 1e-6, 16)
    (out[0].float().sum() * 0).backward()  # only the output reaches the loss; the FP8 outputs never do
    assert g.grad is not None
