"""Host-side grid arithmetic (fp8coat._grid) equals Triton's constexpr functions (which cost µs per host call)."""

import pytest

from fp8coat._grid import cdiv, next_power_of_2, padded, tile_2d

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_triton():
    for a in list(range(1100)) + [2**20 - 1, 2**20, 2**20 + 1, 8192 * 11008]:
        for b in (1, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
        assert next_power_of_2(a) == triton.next_power_of_2(a), a


def test_tile_2d_reproduces_each_launchers_rule():
    """The tile rule the quantization, activation and norm launchers share: the sizes each picked before."""
    np2 = triton.next_power_of_2
    for r in (0, 1, 3, 17, 64, 1000, 8192):
        for k in (1, 15, 16, 48, 200, 1000, 4096, 11008, 70000):
            for g in (16, 32, 128):
                block_k = max(g, min(1024, np2(max(k, 1))))  # quantization kernels
                assert tile_2d(r, k, min_k=g, max_k=1024, elems=4096) == (
                    max(1, min(np2(max(r, 1)), 4096 // block_k)), block_k)
                for max_k, elems in ((1024, 2048), (4096, 16384)):  # activations: GPU, interpreter
                    block_k = max(g, min(max_k, np2(max(k, 1))))
                    assert tile_2d(r, k, min_k=g, max_k=max_k, elems=elems) == (
                        max(1, min(np2(max(r, 1)), elems // block_k)), block_k)
                block_h = max(g, np2(k))  # norms: whole rows
                assert tile_2d(r, k, min_k=g, max_k=None, elems=4096) == (
                    max(1, min(np2(max(r, 1)), 4096 // block_h)), block_h)


def test_padded():
    assert [padded(n) for n in (0, 1, 16, 17, 33)] == [0, 16, 16, 32, 48]
    assert padded(5, 1) == 5
