"""Host-side grid arithmetic equals Triton's constexpr functions (which cost µs per host call)."""

import pytest

from fp8coat._grid import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_cdiv_and_next_power_of_2_match_triton():
    for a in list(range(0, 1100)) + [2**20 - 1, 2**20, 2**20 + 1, 8192 * 11008]:
        for b in (1, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
