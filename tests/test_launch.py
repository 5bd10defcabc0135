"""FastKernel: the cached direct launch of Triton kernels (fp8coat._launch).

On the CPU the JIT is replaced by a recording fake with the same interface (the real JIT needs a GPU); the GPU
test in ``test_gpu.py`` checks against Triton itself that the fast path picks the kernel the JIT picks.
"""

from types import SimpleNamespace

import pytest
import torch

from fp8coat import _launch
from fp8coat._launch import FastKernel


class _FakeCompiled:
    def __init__(self, log, key):
        self.log, self.key = log, key
        self.function, self.packed_metadata = object(), object()

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
        assert function is self.function and packed is self.packed_metadata and meta is None
        self.log.append(("direct", self.key, (g0, g1, g2), stream, args))


class _FakeJIT:
    """Mimics a JITFunction: ``fn[grid](*args, **kw)`` launches and returns the compiled kernel of the
    specialization (one per distinct key, as the JIT's cache)."""

    def __init__(self, names, constexprs):
        self.arg_names = names
        self.params = [SimpleNamespace(name=n, is_constexpr=n in constexprs) for n in names]
        self.device_caches = {}
        self.log, self.kernels = [], {}

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            key = (tuple(_launch._arg_key(a) for a in args), tuple(sorted(kwargs.items())))
            kernel = self.kernels.setdefault(key, _FakeCompiled(self.log, key))
            self.log.append(("jit", key, grid, args, kwargs))
            return kernel
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1234, raising=False)


def test_first_launch_compiles_through_the_jit_then_direct_with_every_argument_in_order(fake_cuda):
    fn = _FakeJIT(["x_ptr", "n", "eps", "BLOCK", "FLAG"], {"BLOCK", "FLAG"})
    k = FastKernel(fn)
    x = torch.zeros(64)
    k[(4,)](x, 100, 0.5, BLOCK=64, FLAG=True)
    assert [e[0] for e in fn.log] == ["jit"]
    k[(5, 2)](x, 100, 0.25, BLOCK=64, FLAG=True)  # same specialization: another n-bucket value, another float
    kind, key, grid, stream, args = fn.log[-1]
    assert kind == "direct" and grid == (5, 2, 1) and stream == 1234
    assert args == (x, 100, 0.25, 64, True)  # runtime arguments, then the constexprs in signature order
    assert k.cached_kernel((x, 100, 0.25), {"BLOCK": 64, "FLAG": True}) is fn.kernels[key]


@pytest.mark.parametrize("change", ["int_is_one", "int_div16", "int_64bit", "unaligned", "dtype", "constexpr",
                                    "num_warps"])
def test_each_specialization_gets_its_own_kernel(fake_cuda, change):
    fn = _FakeJIT(["x_ptr", "n", "BLOCK"], {"BLOCK"})
    k = FastKernel(fn)
    base = torch.zeros(64)
    args, kw = (base, 100), {"BLOCK": 64}
    k[(1,)](*args, **kw)
    k[(1,)](*args, **kw)
    assert [e[0] for e in fn.log] == ["jit", "direct"]
    other = {
        "int_is_one": ((base, 1), kw),
        "int_div16": ((base, 96), kw),
        "int_64bit": ((base, 2**31 + 7), kw),
        "unaligned": ((base[1:], 100), kw),
        "dtype": ((base.to(torch.bfloat16), 100), kw),
        "constexpr": (args, {"BLOCK": 128}),
        "num_warps": (args, {"BLOCK": 64, "num_warps": 8}),
    }[change]
    k[(1,)](*other[0], **other[1])
    assert fn.log[-1][0] == "jit", "a different specialization must be compiled/looked up by the JIT"
    k[(1,)](*other[0], **other[1])
    assert fn.log[-1][0] == "direct" and len(fn.kernels) == 2


def test_jit_path_for_interpreter_hooks_and_unusual_calls(fake_cuda, monkeypatch):
    fn = _FakeJIT(["x_ptr", "BLOCK"], {"BLOCK"})
    x = torch.zeros(4)
    k = FastKernel(fn)
    for _ in range(2):
        k[(1,)](x, 16)  # constexpr passed positionally: not bound by the fast path
        k[(1,)](x, BLOCK=16, unknown=3)  # an unknown keyword: the JIT reports it
    assert [e[0] for e in fn.log] == ["jit"] * 4
    k[(1,)](x, BLOCK=16)
    k[(1,)](x, BLOCK=16)
    assert [e[0] for e in fn.log[-2:]] == ["jit", "direct"]
    with monkeypatch.context() as m:
        m.setattr(_launch.knobs.runtime, "launch_enter_hook", lambda *a: None)
        k[(1,)](x, BLOCK=16)
        assert fn.log[-1][0] == "jit"  # a profiler hook sees every launch
    chain = _launch.knobs.runtime.launch_exit_hook
    if hasattr(chain, "add"):  # newer Triton: hooks are chains, empty by default
        chain.add(print)
        try:
            k[(1,)](x, BLOCK=16)
            assert fn.log[-1][0] == "jit"
        finally:
            chain.remove(print)
    interp = _FakeJIT(["x_ptr", "BLOCK"], {"BLOCK"})
    del interp.device_caches  # the interpreter's functions have no device caches
    ki = FastKernel(interp)
    ki[(1,)](x, BLOCK=16)
    ki[(1,)](x, BLOCK=16)
    assert [e[0] for e in interp.log] == ["jit", "jit"]


def test_constexprs_must_come_last():
    with pytest.raises(ValueError, match="constexpr parameters must come last"):
        FastKernel(_FakeJIT(["BLOCK", "x_ptr"], {"BLOCK"}))


def test_constexprs_told_apart_as_the_jit_does(fake_cuda):
    """The JIT keys constexprs on their text: 0.0 and -0.0, True and 1 are different kernels; a NaN constexpr is
    one kernel, not a new cache entry per call."""
    fn = _FakeJIT(["x_ptr", "C"], {"C"})
    k = FastKernel(fn)
    x = torch.zeros(4)
    for value in (0.0, -0.0, True, 1, float("nan"), float("nan"), float("nan")):
        k[(1,)](x, C=value)
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit", "jit", "jit", "direct", "direct"]
    assert len(k._compiled) == 5


def test_callable_grid_takes_the_jit_path(fake_cuda):
    fn = _FakeJIT(["x_ptr", "BLOCK"], {"BLOCK"})
    k = FastKernel(fn)
    x = torch.zeros(4)
    for _ in range(3):
        k[lambda meta: (1,)](x, BLOCK=16)
    assert [e[0] for e in fn.log] == ["jit"] * 3
