"""Blocked execution: threads and blocks change nothing but speed; helpers mirror torch."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from service.core import kernels, optimizers
from service.core.kernels import Lerp, decay_add_square_, elementwise, signed_grad


@pytest.fixture
def restore_kernel_settings() -> Iterator[None]:
    saved = (kernels.BLOCK, kernels.PARALLEL_BLOCK, kernels.PARALLEL_MIN, kernels._threads)
    saved_work = kernels.PARALLEL_MIN_WORK
    kernels.PARALLEL_MIN_WORK = 0  # small test tensors would otherwise stay on one thread
    yield
    kernels.BLOCK, kernels.PARALLEL_BLOCK, kernels.PARALLEL_MIN = saved[:3]
    kernels.PARALLEL_MIN_WORK = saved_work
    kernels.set_threads(saved[3])


def _adam_deltas(size: int, steps: int = 3) -> np.ndarray:
    adam = optimizers.get("AdamW")
    hp = adam.resolve({"lr": 0.01, "amsgrad": True})
    rng = np.random.default_rng(1)
    param = rng.standard_normal(size).astype(np.float32)
    state = adam.init([param.shape], hp, np.dtype(np.float32))
    out = np.empty_like(param)
    for _ in range(steps):
        grad = rng.standard_normal(size).astype(np.float32)
        state = adam.update([grad], state, [param], hp, [out])
        param += out
    return param


@pytest.mark.usefixtures("restore_kernel_settings")
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_and_blocks_give_bit_identical_results(threads: int) -> None:
    size = 10_007  # not a multiple of any block size: every split has a ragged end
    kernels.set_threads(1)
    serial = _adam_deltas(size)
    kernels.BLOCK, kernels.PARALLEL_BLOCK, kernels.PARALLEL_MIN = 512, 640, 1024
    kernels.set_threads(threads)
    np.testing.assert_array_equal(_adam_deltas(size), serial)


@pytest.mark.usefixtures("restore_kernel_settings")
def test_threads_share_blocks_and_cover_each_element_once() -> None:
    kernels.PARALLEL_BLOCK, kernels.PARALLEL_MIN = 100, 1000
    kernels.set_threads(2)
    threads: set[int] = set()

    def kernel(counts: np.ndarray) -> None:
        threads.add(threading.get_ident())
        counts += 1
        time.sleep(0.002)  # long enough for the pool thread to wake and take blocks

    counts = np.zeros(10_050, dtype=np.int64)
    elementwise(kernel, [counts])
    np.testing.assert_array_equal(counts, 1)
    assert len(threads) == 2


def test_absent_arrays_reach_the_kernel_as_none() -> None:
    seen: list[object] = []

    def kernel(a: np.ndarray, missing: None, out: np.ndarray, s: np.ndarray) -> None:
        seen.append(missing)
        np.multiply(a, 2.0, out=s)
        out[...] = s

    a = np.arange(6.0).reshape(2, 3)
    out = np.empty_like(a)
    elementwise(kernel, [a, None, out], n_scratch=1)
    np.testing.assert_array_equal(out, a * 2)
    assert seen and all(m is None for m in seen)


def test_non_contiguous_arrays_are_refused() -> None:
    a = np.zeros((4, 4))[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        elementwise(lambda *v: None, [a])


def test_set_threads_rejects_zero() -> None:
    with pytest.raises(ValueError, match="thread count"):
        kernels.set_threads(0)


HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("weight", [0.1, 0.7])  # torch switches formulas at 0.5
def test_lerp_matches_torch_lerp(dtype: type[np.floating], sign: float, weight: float) -> None:
    rng = np.random.default_rng(2)
    avg, g = rng.standard_normal((2, 1000)).astype(dtype)
    if HAVE_TORCH:
        import torch

        t_avg = torch.from_numpy(avg.copy())
        expected = t_avg.lerp_(torch.from_numpy(sign * g), weight).numpy()
    else:  # the exact value, from extended precision
        wide = avg.astype(np.longdouble)
        expected = (wide + weight * (sign * g.astype(np.longdouble) - wide)).astype(dtype)
    Lerp.of(weight, np.dtype(dtype)).apply_(avg, g, sign, np.empty_like(avg))
    # torch may fuse the multiply-add: results agree to a few ulps of the inputs (~1).
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(avg, expected, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decay_add_square_matches_torch_mul_addcmul(dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(3)
    avg, g = rng.standard_normal((2, 1000)).astype(dtype)
    avg = np.abs(avg)
    if HAVE_TORCH:
        import torch

        t_g = torch.from_numpy(g)
        expected = torch.from_numpy(avg.copy()).mul_(0.99).addcmul_(t_g, t_g, value=0.01).numpy()
    else:  # the exact value, from extended precision
        wide = g.astype(np.longdouble)
        expected = (0.99 * avg.astype(np.longdouble) + 0.01 * wide * wide).astype(dtype)
    decay_add_square_(avg, g, 0.99, 1 - 0.99, np.empty_like(avg))
    np.testing.assert_allclose(avg, expected, rtol=4 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_signed_grad_is_torchs_effective_gradient(maximize: bool, weight_decay: float) -> None:
    rng = np.random.default_rng(4)
    g, p = rng.standard_normal((2, 100))
    decayed = p if weight_decay != 0 else None
    array, sign = signed_grad(g, decayed, weight_decay, maximize, np.empty_like(g))
    expected = (-g if maximize else g) + weight_decay * p
    np.testing.assert_allclose(sign * array, expected, rtol=1e-15)
    assert (array is g) == (weight_decay == 0)
