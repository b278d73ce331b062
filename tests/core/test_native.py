"""The native kernels compute numpy's bits: the same results with and without them.

Where the extension was not built (no C compiler at install), these tests are skipped and
core runs numpy alone; CI builds it (``.ci/run`` installs a compiler where one is missing).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from service.core import kernels, native, reductions
from service.core.optimizers.adam import Adam, AdamW

pytestmark = pytest.mark.skipif(not native.built(), reason="native kernels not built")

LANES = reductions.LANES
SIZES = (1, 2, 7, 1000, LANES - 1, LANES, LANES + 1, 5 * LANES + LANES // 3, 1_000_003)


def _values(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)


def _bits(x: float) -> bytes:
    return np.float64(x).tobytes()


@pytest.mark.parametrize("n", SIZES)
def test_a_metrics_sum_of_squares_has_numpys_bits(n: int) -> None:
    a = _values(n, n)
    got = reductions.metric_sum_of_squares(a)
    with native.disabled():
        expected = reductions.metric_sum_of_squares(a)
    assert _bits(got) == _bits(expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_a_float64_sum_of_squares_has_numpys_bits(n: int, dtype: type) -> None:
    """The sum clipping reads (and a float64 session's metrics): widened squares."""
    a = _values(n, n).astype(dtype)
    got = reductions.sum_of_squares(a)
    with native.disabled():
        expected = reductions.sum_of_squares(a)
    assert _bits(got) == _bits(expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "values", [[np.inf, 1.0], [np.nan, 1.0], [3e38, 3e38], [1e-30, 1e-30], [-0.0, 0.0]]
)
def test_special_values_take_the_same_way_through_both(values: list[float], dtype: type) -> None:
    a = np.array(values * 50_000, dtype=dtype)
    sums = (reductions.metric_sum_of_squares, reductions.sum_of_squares)
    got = [f(a) for f in sums]
    with native.disabled():
        expected = [f(a) for f in sums]
    assert [_bits(x) for x in got] == [_bits(x) for x in expected]


def test_a_strided_or_read_only_array_is_summed_as_its_elements() -> None:
    a = _values(3 * LANES + 5, 1)
    view = a[::3]
    readonly = a.copy()
    readonly.flags.writeable = False
    sums = (reductions.metric_sum_of_squares, reductions.sum_of_squares)
    with native.disabled():
        expected = [f(x) for f in sums for x in (view, a)]
    got = [f(x) for f in sums for x in (view, readonly)]
    assert [_bits(x) for x in got] == [_bits(x) for x in expected]


def _hparams(cls: type[Adam], lr: float, beta1: float, wd: float, maximize: bool) -> dict[str, Any]:
    hp: dict[str, Any] = {
        "lr": lr,
        "betas": (beta1, 0.999),
        "eps": 1e-8,
        "weight_decay": wd,
        "amsgrad": False,
        "maximize": maximize,
    }
    if cls is Adam:
        hp["decoupled_weight_decay"] = False
    return hp


VARIANTS = list(
    itertools.product(
        (Adam, AdamW),
        (0.9, 0.3),  # lerp's weight 1 - beta1 below and above 0.5: torch's two formulas
        (0.0, 0.1),  # no weight decay; coupled (Adam) or decoupled (AdamW)
        (False, True),
    )
)


@pytest.mark.parametrize(("cls", "beta1", "wd", "maximize"), VARIANTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_adam_steps_have_numpys_bits(
    cls: type[Adam], beta1: float, wd: float, maximize: bool, threads: int
) -> None:
    """Deltas and both moments, over three steps, across block and thread boundaries."""
    rng = np.random.default_rng(7)
    shapes = [(kernels.PARALLEL_MIN + 12_345,), (5, 7)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    optimizer = cls()
    hp = _hparams(cls, 0.05, beta1, wd, maximize)
    fused = optimizer.init(shapes, hp, np.dtype(np.float32))
    plain = optimizer.init(shapes, hp, np.dtype(np.float32))
    saved = kernels.thread_count()
    kernels.set_threads(threads)
    try:
        for _ in range(3):
            grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            out = [np.empty(s, np.float32) for s in shapes]
            expected = [np.empty(s, np.float32) for s in shapes]
            optimizer.update(grads, fused, params, hp, out)
            with native.disabled():
                optimizer.update(grads, plain, params, hp, expected)
            for got, want in zip(
                [*out, *fused.exp_avg, *fused.exp_avg_sq],
                [*expected, *plain.exp_avg, *plain.exp_avg_sq],
                strict=True,
            ):
                assert got.tobytes() == want.tobytes()
    finally:
        kernels.set_threads(saved)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [0, 1, 2, 3, 5, 1000, 15_625, LANES - 1, LANES])
def test_lanes_are_halved_with_numpys_bits(width: int, dtype: type) -> None:
    lanes = _values(LANES, width).astype(dtype)
    lanes[:4] = [np.float32(1e30), -0.0, np.float32(1e-40), 3.0]  # wide, signed, subnormal
    compiled = native.kernels
    assert compiled is not None
    wide = np.empty(LANES)
    got = compiled.halve(lanes, wide, width)
    expected = reductions._halve(lanes[:width].astype(np.float64))
    assert _bits(got) == _bits(expected)
    if dtype is np.float64:  # in place, as the float64 lanes are halved
        assert _bits(compiled.halve(lanes, lanes, width)) == _bits(expected)


@pytest.mark.parametrize("n", [3, 15_625, LANES + 7])
def test_totals_and_dot_products_have_numpys_bits(n: int) -> None:
    a, b = _values(n, 1), _values(n, 2)
    got = [reductions.total(a), reductions.abs_total(a), reductions.dot(a, b)]
    with native.disabled():
        expected = [reductions.total(a), reductions.abs_total(a), reductions.dot(a, b)]
    assert [_bits(x) for x in got] == [_bits(x) for x in expected]


def test_bad_buffers_are_refused_not_read() -> None:
    compiled = native.kernels
    assert compiled is not None
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="float32"):
        compiled.square_lanes(np.ones(10), np.empty(LANES, np.float32))
    with pytest.raises(ValueError, match="shorter"):
        compiled.square_lanes(x, np.empty(5, np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        compiled.wide_square_lanes(np.ones(10, np.int64), np.empty(LANES))
    with pytest.raises(TypeError, match="lanes must be float64"):
        compiled.wide_square_lanes(x, np.empty(LANES, np.float32))
    with pytest.raises(ValueError, match="width elements"):
        compiled.halve(np.ones(4), np.empty(8), 5)
    with pytest.raises(ValueError, match="width elements"):
        compiled.halve(np.ones(8), np.empty(4), 5)
    with pytest.raises(TypeError, match="scratch must be float64"):
        compiled.halve(np.ones(8), np.empty(8, np.float32), 5)
    scalars = (0.1, 0.9, True, False, 0.001, 0.999, 1e-8, -1e-3, 0.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        compiled.adam(x, None, x.copy(), x.copy(), np.empty(9, np.float32), *scalars, 0)
    with pytest.raises(ValueError, match="needs p"):
        compiled.adam(x, None, x.copy(), x.copy(), x.copy(), *scalars, 1)


def test_optserve_native_0_turns_them_off() -> None:
    code = "from service.core import native; print(native.kernels is None, native.built())"
    env = {**os.environ, "OPTSERVE_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "True"]
