"""Core's fixed-order sums: accurate, and ordered by the length alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.core import reductions

LANES = reductions.LANES
SIZES = (0, 1, 2, 7, 1000, LANES - 1, LANES, LANES + 1, 5 * LANES + LANES // 3)


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
    # Each term passes through one addition per row of lanes, then the tree over the lanes.
    depth = -(-n // LANES) + math.ceil(math.log2(max(min(n, LANES), 2)))
    for name, (got, terms, magnitudes) in cases.items():
        exact = math.fsum(terms)
        bound = depth * 2**-53 * math.fsum(magnitudes.tolist())
        assert abs(got - exact) <= bound, (name, got, exact)


def test_norm2_is_the_square_root_of_the_sum_of_squares() -> None:
    a = _values(5000, np.float64)
    assert reductions.norm2(a) == math.sqrt(reductions.sum_of_squares(a))


def _reference_order(values: list[float], lanes: int) -> float:
    """The documented order, in Python floats (IEEE doubles): lane ``i % lanes`` adds its
    elements in order, then the lanes are halved into one."""
    sums = values[:lanes]
    for lo in range(lanes, len(values), lanes):
        for j, v in enumerate(values[lo : lo + lanes]):
            sums[j] += v
    while len(sums) > 1:
        half = len(sums) // 2
        carried = [sums[-1]] if len(sums) % 2 else []
        sums = [sums[j] + sums[half + j] for j in range(half)] + carried
    return sums[0] if sums else 0.0


@pytest.mark.parametrize("n", [0, 1, 6, 1001, LANES, 3 * LANES + 5])
def test_the_order_is_the_documented_one(n: int) -> None:
    """The order is part of what a stored session means: this pins it to the bit."""
    a, b = _values(n, np.float32, 3), _values(n, np.float64, 4)
    wide = a.astype(np.float64)
    assert reductions.total(b) == _reference_order(b.tolist(), LANES)
    assert reductions.abs_total(a) == _reference_order(np.abs(wide).tolist(), LANES)
    assert reductions.dot(a, b) == _reference_order((wide * b).tolist(), LANES)
    assert reductions.sum_of_squares(a) == _reference_order((wide * wide).tolist(), LANES)


def test_the_shape_does_not_matter_only_the_elements_in_order() -> None:
    a = _values(6 * LANES, np.float32)
    assert reductions.sum_of_squares(a.reshape(6, -1)) == reductions.sum_of_squares(a)


def test_dot_refuses_arrays_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="sizes 3 and 4"):
        reductions.dot(np.ones(3), np.ones(4))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_sum_of_squares_is_the_dot_of_an_array_with_itself_to_the_bit(dtype: type) -> None:
    """Squares are taken in one widening ufunc call, products by widening first: the two
    must round alike, or a norm would change with the function that took it."""
    a = _values(3 * LANES + 11, dtype, 5)
    assert reductions.sum_of_squares(a) == reductions.dot(a, a)


@pytest.mark.parametrize("size", [1, 1000, reductions.LANES + 1, 1_000_003])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e12])
def test_a_metrics_float32_sum_of_squares_is_within_float32_roundings_of_float64s(
    size: int, scale: float
) -> None:
    a = (np.random.default_rng(size).standard_normal(size) * scale).astype(np.float32)
    narrow = reductions.metric_sum_of_squares(a)
    assert narrow == reductions.metric_sum_of_squares(a.copy())  # its order is fixed
    exact = math.fsum(float(x) * float(x) for x in a[:20_000]) if size <= 20_000 else None
    wide = reductions.sum_of_squares(a)
    assert narrow == pytest.approx(wide, rel=1e-6)
    if exact is not None:
        assert narrow == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        [1e20, 1e20],  # the float32 squares overflow
        [1e-25] * 1000,  # they fall below float32's range
        [0.0, 0.0],
        [np.nan, 1.0],
        [np.inf, 1.0],
    ],
)
def test_a_metrics_float32_sum_that_cannot_hold_is_taken_in_float64(values: list[float]) -> None:
    a = np.array(values, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        narrow = reductions.metric_sum_of_squares(a)
        wide = reductions.sum_of_squares(a)
    assert narrow == wide or (math.isnan(narrow) and math.isnan(wide))


def test_other_dtypes_sum_their_squares_in_float64() -> None:
    a = np.random.default_rng(0).standard_normal(3 * reductions.LANES)
    assert reductions.metric_sum_of_squares(a) == reductions.sum_of_squares(a)
