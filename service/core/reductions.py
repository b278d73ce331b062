"""Sums, dot products and norms whose rounding is the same on every machine.

A replica that takes a session over replays its events and must reach the acknowledged
state bit for bit (docs/storage.md, "Replays across machines"). Elementwise IEEE
operations (add, multiply, divide, sqrt) are correctly rounded, so they agree everywhere;
a reduction's result depends on the order of its additions, and numpy and BLAS choose
that order at run time: ``np.dot`` goes to an OpenBLAS kernel picked by CPU model and
split over as many threads as the machine has cores, ``np.sum`` to a SIMD loop picked by
the CPU's features. Measured on one machine, ``np.dot`` of 300k float64 values gave other
bits with one BLAS thread than with two, and under OpenBLAS's Haswell kernels than under
its SkylakeX ones.

So core's reductions are built here from elementwise operations in an order fixed by the
length alone: element ``i`` goes to lane ``i % LANES``, each lane adds its elements in
order (one ``np.add`` of a row of lanes at a time), and the lanes are summed by a halving
tree (``x[:h] + x[h:2h]``, the odd last one carried). Float32 values are summed in float64
(their squares and products are exact there), which keeps the result within a rounding
or two of the exact sum: closer to torch's than numpy's float32 accumulation was
(``np.dot`` of 3M float32 values was off by 2.5e-6 relative, this by about 1e-16).

``LANES`` and the order are part of what a stored session means: changing either changes
the last bits of replayed states, like a change of formula would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from service.core import native
from service.core.kernels import scratch

LANES = 1 << 15
"""Partial sums kept side by side: 256 KiB of float64, so the running sums and one row of
terms stay in L2, and each ``np.add`` is long enough that its call overhead is small
(shorter rows measured slower, longer ones no faster)."""

_F64 = np.dtype(np.float64)
_F32 = np.dtype(np.float32)

METRIC_NARROW_MIN = 1e-20
"""Float32 sums of squares below this are taken again in float64: a square under 1e-38
loses bits (float32's subnormals), and 10M of them are at most 1e-31, which a sum of at
least 1e-20 does not show."""


def _halve(values: np.ndarray) -> float:
    """Sum a float64 buffer in place by halving: the order depends on its length only."""
    n = values.size
    while n > 1:
        half = n // 2
        np.add(values[:half], values[half : 2 * half], out=values[:half])
        if n % 2:
            values[half] = values[n - 1]
            n = half + 1
        else:
            n = half
    return float(values[0]) if n else 0.0


Leaf = Callable[[np.ndarray, np.ndarray | None, np.ndarray], None]
"""Writes a row's terms (in the dtype the lanes accumulate in) into the scratch view, from
one or two input rows."""


def _reduce(
    leaf: Leaf, a: np.ndarray, b: np.ndarray | None = None, accumulate: np.dtype[Any] = _F64
) -> float:
    flat_a = a.reshape(-1)
    flat_b = None if b is None else b.reshape(-1)
    n = flat_a.size
    if n == 0:
        return 0.0
    sums, terms = scratch(2, accumulate, LANES)
    width = min(n, LANES)
    leaf(flat_a[:width], None if flat_b is None else flat_b[:width], sums[:width])
    for lo in range(LANES, n, LANES):
        hi = min(lo + LANES, n)
        row = terms[: hi - lo]
        leaf(flat_a[lo:hi], None if flat_b is None else flat_b[lo:hi], row)
        np.add(sums[: hi - lo], row, out=sums[: hi - lo])
    return _halved(sums, width)


def _halved(sums: np.ndarray, width: int) -> float:
    """The total of the first ``width`` lanes, halved in float64 whatever they hold (by
    the native loop where it was built: the same additions, without a ufunc call per
    level, which cost most of a small tensor's norm)."""
    wide = sums if sums.dtype == _F64 else scratch(1, _F64, LANES)[0]
    compiled = native.kernels
    if compiled is not None:
        return float(compiled.halve(sums, wide, width))
    if wide is not sums:
        wide[:width] = sums[:width]
    return _halve(wide[:width])


def _squares_summed(a: np.ndarray, accumulate: np.dtype[Any], leaf: Leaf) -> float:
    """``a``'s squares summed in lanes of ``accumulate``: by the native loop where it was
    built and takes ``a`` (one pass, the same additions in the same order), else a row of
    lanes at a time, each row's squares made by ``leaf``."""
    compiled = native.kernels
    flat = a.reshape(-1)
    if (
        compiled is None
        or flat.size == 0
        or not flat.flags.c_contiguous
        or flat.dtype not in (_F32, _F64)
    ):
        return _reduce(leaf, flat, accumulate=accumulate)
    (lanes,) = scratch(1, accumulate, LANES)
    # float32 lanes of float32 squares (a metric's), or float64 lanes of widened ones.
    summing = compiled.square_lanes if accumulate == _F32 else compiled.wide_square_lanes
    summing(flat, lanes)
    return _halved(lanes, min(flat.size, LANES))


def _copy(a: np.ndarray, _: np.ndarray | None, out: np.ndarray) -> None:
    out[...] = a


def _abs(a: np.ndarray, _: np.ndarray | None, out: np.ndarray) -> None:
    out[...] = a
    np.abs(out, out=out)


def _product(a: np.ndarray, b: np.ndarray | None, out: np.ndarray) -> None:
    # Widening first makes a float32 product exact (a ufunc's own casting measured slower).
    if a.dtype == out.dtype and b is not None and b.dtype == out.dtype:
        np.multiply(a, b, out=out)
        return
    out[...] = a
    np.multiply(out, a if b is None else b, out=out)


def _square(a: np.ndarray, _: np.ndarray | None, out: np.ndarray) -> None:
    # The same bits as widening, then multiplying (a widened square is the correctly
    # rounded float64 product either way), in one ufunc call instead of two: a 1M float32
    # norm measured 0.43 ms against 0.66 ms.
    np.square(a, out=out, dtype=_F64)


def _square_unwidened(a: np.ndarray, _: np.ndarray | None, out: np.ndarray) -> None:
    np.multiply(a, a, out=out)


def metric_sum_of_squares(a: np.ndarray) -> float:
    """The sum of ``a * a`` for a norm that is only reported (a step's ``grad_norm``,
    ``update_norm``, ``param_norm``). A float32 ``a`` is squared and summed in float32 in
    :func:`sum_of_squares`'s lanes and order (the same bits on every machine; the lanes
    halved in float64), at half the cost: 0.27 against 0.57 ms at 1M elements, 4.2
    against 8.7 ms at 10M. Each lane adds a row of 32K elements at a time, so its sum
    stays within a few float32 roundings of the float64 one: 1e-9 relative on 1M and 10M
    random values, which the float32 norm then rounds away.

    A float32 sum that overflowed, or so small (below :data:`METRIC_NARROW_MIN`) that
    squares may have lost bits below float32's range, is taken again in float64, as is
    any other dtype. A number an update reads (a clipped gradient's norm) is never this:
    it stays :func:`sum_of_squares`'s, which stored sessions replay."""
    if a.dtype != _F32:
        return sum_of_squares(a)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        summed = _squares_summed(a, _F32, _square_unwidened)
    if METRIC_NARROW_MIN <= summed < math.inf:
        return summed
    return sum_of_squares(a)


def total(a: np.ndarray) -> float:
    """The sum of ``a``'s elements, in float64."""
    return _reduce(_copy, a)


def abs_total(a: np.ndarray) -> float:
    """The sum of ``|a|``, in float64 (the 1-norm)."""
    return _reduce(_abs, a)


def sum_of_squares(a: np.ndarray) -> float:
    """The sum of ``a * a``, in float64 (the squared 2-norm)."""
    return _squares_summed(a, _F64, _square)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of two arrays of the same size, in float64."""
    if a.size != b.size:
        raise ValueError(f"dot of arrays of sizes {a.size} and {b.size}")
    return _reduce(_product, a, b)


def norm2(a: np.ndarray) -> float:
    """The 2-norm, in float64 (round it to the tensor's dtype as torch returns it)."""
    return float(np.sqrt(sum_of_squares(a)))


def total_norm(arrays: Iterable[np.ndarray]) -> float:
    """The 2-norm over several arrays taken as one vector, in float64."""
    return math.sqrt(sum(sum_of_squares(a) for a in arrays))
