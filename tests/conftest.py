"""Test setup.

On machines without CUDA, Triton kernels run in the interpreter (set before any kernel is defined), with the
interpreter's float casts replaced by torch's: its own are wrong in ~2% of fp8 downcasts (triton-lang/triton#8322),
turn NaN into inf on fp8 upcasts and truncate fp32 -> bf16 instead of rounding to nearest-even.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_float_casts() -> None:
    try:
        import numpy as np
        import triton.language as tl
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    if getattr(interp, "_fp8coat_cast_patched", False):
        return
    original = interp._convert_float
    torch_dtypes = {
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
        tl.float32: torch.float32,
        tl.float16: torch.float16,
        tl.bfloat16: torch.bfloat16,
    }

    int_of_width = {8: (np.uint8, torch.uint8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32)}

    def convert_float(x, src, dst, rounding_mode):
        if src in torch_dtypes and dst in torch_dtypes and src != dst:
            np_int, torch_int = int_of_width[src.primitive_bitwidth]
            t = torch.from_numpy(np.ascontiguousarray(x).view(np_int)).view(torch_dtypes[src])
            np_out, torch_out = int_of_width[dst.primitive_bitwidth]
            out = t.to(torch_dtypes[dst]).view(torch_out).numpy()
            return out.view(getattr(np, f"uint{dst.primitive_bitwidth}")).reshape(x.shape)
        return original(x, src, dst, rounding_mode)

    interp._convert_float = convert_float
    interp._fp8coat_cast_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_float_casts()


def pytest_collection_modifyitems(config, items):
    import pytest

    fp8_gpu = ON_GPU and torch.cuda.get_device_capability() >= (8, 9)
    skip = pytest.mark.skip(reason="needs a CUDA GPU with FP8 support (sm_89+)")
    for item in items:
        if "gpu" in item.keywords and not fp8_gpu:
            item.add_marker(skip)


def _online(host: str = "pypi.org", port: int = 443) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _skip_when_offline(fetch):
    """``fetch`` (a corpus download) that skips the test instead of failing when there is no network: the named
    corpora are fetched once into the cache, so offline runs of ``make test`` pass wherever they are not cached."""
    import functools

    import pytest

    @functools.wraps(fetch)
    def wrapper(*args, **kwargs):
        try:
            return fetch(*args, **kwargs)
        except RuntimeError as e:
            if _online():
                raise
            pytest.skip(f"a corpus is not cached and there is no network to fetch it: {e}")

    return wrapper


def pytest_configure(config):
    try:
        from fp8coat.train.data import debian, sdist
    except ImportError:  # the train extra is absent
        return
    sdist._download = _skip_when_offline(sdist._download)
    debian.download_deb = _skip_when_offline(debian.download_deb)
