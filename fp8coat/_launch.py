"""Launching a Triton kernel again with less host work than ``kernel[grid](...)``.

On every call Triton's JIT launch (``JITFunction.run``) binds the arguments to the signature, derives what each
one specializes to, builds a cache key from that and looks the compiled kernel up, checks the kernel's globals
and prepares launch metadata for profiler hooks, and only then calls the compiled kernel's C launcher. fp8coat's
kernels are launched several times per layer and step with the same kinds of arguments, and that host time adds
up (tens of µs per linear layer). :class:`FastKernel` wraps a ``triton.jit`` function with the same call syntax,
``kernel[grid](*args, **constexprs)``, and keeps each compiled kernel under a key computed in plain Python from
exactly what the JIT specializes on:

  * tensors: dtype and whether ``data_ptr()`` is 16-byte aligned;
  * ints: equal to 1 (the JIT bakes 1 in as a constant), divisible by 16, and which integer type holds the value
    (i32, i64 or u64);
  * floats and bools by type; everything else (constexprs, launch options such as ``num_warps``) by type and
    value (floats by their repr);
  * the current CUDA device.

The first call with a new key goes through the JIT (which compiles if needed) and keeps the compiled kernel it
returns; later calls with that key call the compiled kernel's launcher directly, with the arguments in the order
the JIT passes them (every parameter of the signature, constexprs included). The JIT path is taken every time
for the Triton interpreter (CPU tensors under ``TRITON_INTERPRET=1``), on ROCm (whose backend also specializes
pointers on the size of their storage), when a launch hook is installed (a profiler), for a callable grid, or when
arguments are passed in a way the fast path does not bind (missing parameters, keywords for non-constexpr
parameters). Settings the JIT reads on every launch (``knobs.runtime.debug``, instrumentation, pre-run hooks)
take effect for a kernel's later launches only through the JIT path: change them before the first launch.
``tests/test_gpu.py`` checks on the GPU that the fast path picks the very kernel object the JIT picks, for
arguments that differ in each specialization.
"""

from __future__ import annotations

import torch
from triton import knobs

__all__ = ["FastKernel", "fast_kernel"]

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_pdl")
_JIT_ONLY = object()  # cached for keys whose launches must take the JIT path (interpreter: no compiled kernel)


def _int_key(v: int) -> tuple:
    return (int, v == 1, v % 16 == 0, -(2**31) <= v < 2**31, v >= 2**63)


def _arg_key(a) -> object:
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):  # before int: bool is an int
        return (bool, a)
    if isinstance(a, int):
        return _int_key(a)
    if isinstance(a, float):
        return float
    return (type(a), a)


def _const_key(v) -> object:
    """A constexpr as the JIT tells them apart (it keys on their text): by type, floats by repr (0.0 vs -0.0,
    NaN equal to itself)."""
    return (type(v), repr(v) if isinstance(v, float) else v)


class FastKernel:
    """A ``triton.jit`` function launched through its cached compiled kernels (see the module docstring).

    ``fn``: the jitted function (kept as ``.fn``: tools that inspect the kernel use it). Its constexpr parameters
    must come after all the others in the signature, and calls pass the non-constexpr ones positionally.
    """

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = list(getattr(fn, "arg_names", ()))
        params = getattr(fn, "params", None)
        constexprs = [p.name for p in params if p.is_constexpr] if params is not None else []
        self.n_runtime = len(self.arg_names) - len(constexprs)
        self.constexpr_names = self.arg_names[self.n_runtime:]
        if constexprs != self.constexpr_names:
            raise ValueError(f"{getattr(fn, '__name__', fn)}: constexpr parameters must come last")
        self._compiled: dict = {}
        # the interpreter's functions (TRITON_INTERPRET=1) have no compiled kernels; AMD's backend also
        # specializes pointers on their storage size (not in this key)
        self.jit = hasattr(fn, "device_caches") and torch.version.hip is None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, list] | None:
        """(cache key, constexpr values in signature order), or None for calls the fast path does not bind."""
        if len(args) != self.n_runtime:
            return None
        try:
            consts = [kwargs[name] for name in self.constexpr_names]
        except KeyError:
            return None
        options = tuple((k, kwargs[k]) for k in _OPTIONS if k in kwargs)
        if len(consts) + len(options) != len(kwargs):
            return None
        key = (torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(map(_const_key, consts)), options)
        return key, consts

    def launch(self, grid, args: tuple, kwargs: dict):
        """``self.fn[grid](*args, **kwargs)``; returns what the JIT returns on the JIT path, else None."""
        bound = None if not self.jit or callable(grid) or _hooks_installed() else self._bind(args, kwargs)
        if bound is None:
            return self.fn[grid](*args, **kwargs)
        key, consts = bound
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):  # asynchronous compilation
                kernel = kernel.result()
            self._compiled[key] = kernel if hasattr(kernel, "packed_metadata") else _JIT_ONLY
            return kernel
        if kernel is _JIT_ONLY:
            return self.fn[grid](*args, **kwargs)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(g0, g1, g2, torch._C._cuda_getCurrentRawStream(key[0]), kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *consts)
        return None

    def cached_kernel(self, args: tuple, kwargs: dict):
        """The compiled kernel the fast path holds for these arguments (None before their first launch)."""
        bound = self._bind(args, kwargs)
        kernel = self._compiled.get(bound[0]) if bound is not None else None
        return None if kernel is _JIT_ONLY else kernel


def _hooks_installed() -> bool:
    """A launch hook is set: a function (older Triton) or a non-empty ``HookChain`` (newer Triton)."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def fast_kernel(fn) -> FastKernel:
    """Decorator form: ``@fast_kernel`` above ``@triton.jit``."""
    return FastKernel(fn)
