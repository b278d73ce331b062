"""The finiteness check's sums of squares: one pass checks a gradient and gives its norm."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import reductions
from service.core.clipping import total_norm, total_norm_of_squares
from service.core.plan import plan_from_config
from service.core.training import first_nonfinite
from service.sessions.live import norm

VALUES = [[3.0, 4.0], [1e19, 1e19], [1e30, 1e30], [1e38, 1e38], [1e200, 1e200]]


def _plan(dtype: str) -> object:
    params = {"w": {"shape": [2]}, "v": {"shape": [1]}, "u": {"shape": [2]}}
    return plan_from_config(
        {"optimizer": {"name": "SGD", "lr": 0.1}, "params": params, "dtype": dtype}
    )


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (dtype, values)
        for dtype in (np.float32, np.float64)
        for values in VALUES
        if values[0] <= float(np.finfo(dtype).max)
    ],
)
def test_the_norm_from_the_check_has_the_bits_of_a_second_pass(
    dtype: type, values: list[float]
) -> None:
    grads = [np.array(values, dtype=dtype), np.array(values[:1], dtype=dtype)]
    squares: list[float | None] = []
    plan = _plan(np.dtype(dtype).name)
    assert first_nonfinite(plan, [grads[0], grads[1], None], squares) is None  # type: ignore[arg-type]
    assert squares[2] is None
    with np.errstate(over="ignore", invalid="ignore"):
        assert squares[:2] == [reductions.metric_sum_of_squares(g) for g in grads]
        got = total_norm_of_squares([s for s in squares if s is not None], np.dtype(dtype))
        # The reported norm is a step metric's (a second pass over the same gradients)...
        assert float(got) == norm(grads)
        # ...within a float32 rounding of what clipping computes (torch's; float64 lanes).
        clipping = total_norm(grads, 2.0)
    assert got.dtype == clipping.dtype
    np.testing.assert_allclose(float(got), float(clipping), rtol=np.finfo(dtype).eps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_values_are_found_with_or_without_squares(bad: float, dtype: type) -> None:
    plan = _plan(np.dtype(dtype).name)
    grads = [np.array([1.0, 2.0], dtype=dtype), np.array([bad], dtype=dtype), None]
    assert first_nonfinite(plan, grads) == "v"  # type: ignore[arg-type]
    assert first_nonfinite(plan, grads, []) == "v"  # type: ignore[arg-type]


def test_a_sum_of_squares_that_overflows_falls_back_to_the_exact_check() -> None:
    plan = _plan("float64")
    huge = np.array([1e300, -1e300], dtype=np.float64)  # finite; the squares are not
    squares: list[float | None] = []
    assert first_nonfinite(plan, [huge, np.ones(1), None], squares) is None  # type: ignore[arg-type]
    assert squares[0] == np.inf
