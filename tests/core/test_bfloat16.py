"""bfloat16 emulation: rounding and torch's CPU matrix products, to the bit."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import bfloat16
from tests.core.optimizer_checks import HAVE_TORCH

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="compares against torch itself")


def _from_bits(bits: list[int]) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def test_rounds_to_nearest_with_ties_to_even() -> None:
    one, ulp = 0x3F800000, 0x10000  # 1.0 and one bfloat16 ulp at 1, as float32 bits
    values = _from_bits(
        [
            one + 0x7FFF,  # below the midpoint: down
            one + 0x8000,  # midpoint, even below: down
            one + ulp + 0x8000,  # midpoint, odd below: up to even
            one + 0x8001,  # above the midpoint: up
            one + 3 * ulp,  # already bfloat16: unchanged
        ]
    )
    expected = _from_bits([one, one, one + 2 * ulp, one + ulp, one + 3 * ulp])
    np.testing.assert_array_equal(bfloat16.round_(values.copy()), expected)


def test_negative_values_round_by_magnitude() -> None:
    values = _from_bits([0xBF808001, 0xBF808000])
    np.testing.assert_array_equal(
        bfloat16.round_(values.copy()), _from_bits([0xBF810000, 0xBF800000])
    )


def test_inf_and_nan_survive_and_overflow_rounds_to_inf() -> None:
    largest = np.finfo(np.float32).max
    values = np.array([np.inf, -np.inf, np.nan, largest], dtype=np.float32)
    rounded = bfloat16.round_(values.copy())
    assert rounded[0] == np.inf and rounded[1] == -np.inf and np.isnan(rounded[2])
    assert rounded[3] == np.inf


def test_float64_goes_through_float32_first() -> None:
    # Just above a bfloat16 midpoint in float64, but the float32 rounding lands on the
    # midpoint itself, which then ties to even: double rounding, as torch converts.
    midpoint = 1.0 + 2.0**-8
    value = np.array([midpoint + 2.0**-40])
    assert bfloat16.from_array(value)[0] == 1.0


@pytest.mark.torch
@needs_torch
def test_rounding_is_torchs() -> None:
    import torch

    rng = np.random.default_rng(0)
    # Every exponent, subnormals included, and arbitrary bit patterns (finite ones).
    scaled = (rng.standard_normal(20000) * np.exp(rng.uniform(-100, 88, 20000))).astype(np.float32)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([scaled, bits[np.isfinite(bits)]])
    expected = torch.from_numpy(values).bfloat16().float().numpy()
    np.testing.assert_array_equal(bfloat16.round_(values.copy()), expected)


@pytest.mark.torch
@needs_torch
@pytest.mark.parametrize(("rows", "inner", "cols"), [(5, 7, 5), (6, 6, 6), (4, 12, 9), (1, 30, 1)])
def test_addmm_is_torchs_reference_gemm(rows: int, inner: int, cols: int) -> None:
    import torch

    rng = np.random.default_rng(rows * inner * cols)

    def wide(shape: tuple[int, int]) -> np.ndarray:
        # Magnitudes spread over many binades, so that float32 sums round and their
        # order shows in the bfloat16 result.
        return bfloat16.from_array(
            rng.standard_normal(shape) * np.exp(3 * rng.standard_normal(shape))
        )

    for _ in range(100):
        a, b, c = wide((rows, inner)), wide((inner, cols)), wide((rows, cols))
        ta, tb, tc = (torch.from_numpy(x).bfloat16() for x in (a, b, c))
        expected = torch.addmm(tc, ta, tb, beta=-4.775, alpha=2.0315).float().numpy()
        np.testing.assert_array_equal(bfloat16.addmm(c, a, b, beta=-4.775, alpha=2.0315), expected)
        np.testing.assert_array_equal(
            bfloat16.addmm(None, a, b, beta=0.0, alpha=1.0), (ta @ tb).float().numpy()
        )


def test_large_products_stay_within_a_bfloat16_rounding_of_the_exact_product() -> None:
    rng = np.random.default_rng(1)
    a = bfloat16.from_array(rng.standard_normal((40, 60)))
    b = bfloat16.from_array(rng.standard_normal((60, 30)))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = bfloat16.addmm(None, a, b, beta=0.0, alpha=1.0)
    np.testing.assert_allclose(got, exact, rtol=2.0**-8, atol=1e-6)
    np.testing.assert_array_equal(bfloat16.round_(got.copy()), got)
