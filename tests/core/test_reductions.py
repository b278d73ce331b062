"""Core's fixed-order sums: accurate, and ordered by the length alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.core import reductions

SIZES = (
    0,
    1,
    2,
    7,
    1000,
    reductions.BLOCK - 1,
    reductions.BLOCK,
    reductions.BLOCK + 1,
    reductions.CHUNK + 3,
    3 * reductions.CHUNK + reductions.BLOCK // 2,
)


def _values(n: int, dtype: type[np.floating], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Many magnitudes, both signs: a sum whose order shows in its last bits.
    return (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_sums_are_within_a_few_roundings_of_the_exact_sum(n: int, dtype: type) -> None:
    a, b = _values(n, dtype, 1), _values(n, dtype, 2)
    wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
    cases = {
        "total": (reductions.total(a), wide_a.tolist(), np.abs(wide_a)),
        "abs_total": (reductions.abs_total(a), np.abs(wide_a).tolist(), np.abs(wide_a)),
        "sum_of_squares": (reductions.sum_of_squares(a), (wide_a * wide_a).tolist(), wide_a**2),
        "dot": (reductions.dot(a, b), (wide_a * wide_b).tolist(), np.abs(wide_a * wide_b)),
    }
    depth = math.ceil(math.log2(max(n, 2)))
    for name, (got, terms, magnitudes) in cases.items():
        exact = math.fsum(terms)
        # A tree of this depth: each addition rounds once, relative to the sum of |terms|.
        bound = depth * 2**-52 * math.fsum(magnitudes.tolist())
        assert abs(got - exact) <= bound, (name, got, exact)


def test_norm2_is_the_square_root_of_the_sum_of_squares() -> None:
    a = _values(5000, np.float64)
    assert reductions.norm2(a) == math.sqrt(reductions.sum_of_squares(a))


def test_the_order_depends_on_the_block_size_not_on_the_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = _values(5 * reductions.CHUNK + 17, np.float64)
    before = reductions.total(a)
    monkeypatch.setattr(reductions, "CHUNK", reductions.BLOCK)
    assert reductions.total(a) == before
    monkeypatch.setattr(reductions, "CHUNK", 8 * reductions.CHUNK)
    assert reductions.total(a) == before


def test_the_shape_does_not_matter_only_the_elements_in_order() -> None:
    a = _values(6 * reductions.BLOCK, np.float32)
    assert reductions.sum_of_squares(a.reshape(6, -1)) == reductions.sum_of_squares(a)


def test_dot_refuses_arrays_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="sizes 3 and 4"):
        reductions.dot(np.ones(3), np.ones(4))
