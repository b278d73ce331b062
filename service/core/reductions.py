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
length alone: the values are cut into blocks of ``BLOCK`` elements, each block is summed
by a halving tree (``x[:h] + x[h:2h]``, the odd last element carried), and the block sums
by the same tree. Float32 values are summed in float64 (their squares and products are
exact there), which keeps the result within a rounding of the exact sum: closer to
torch's than numpy's float32 accumulation was (``np.dot`` of 3M float32 values was off
by 2.5e-6 relative). Blocks are independent, so the order would not change if they were
ever spread over threads.

``BLOCK`` and the tree are part of what a stored session means: changing either changes
the last bits of replayed states, like a change of formula would.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.core.kernels import scratch

BLOCK = 1 << 15
"""Elements per leaf block."""

CHUNK = 1 << 17
"""Elements whose terms are computed and summed together (4 blocks, 1 MiB of float64
scratch per thread, which stays in L2): one ufunc call per tree level sums all of a
chunk's blocks, so the call overhead is paid per chunk, not per block. The result does
not depend on it: each block is still summed by its own tree."""

_F64 = np.dtype(np.float64)


def _halve(work: np.ndarray) -> np.ndarray:
    """Sum each row of a 2-D float64 buffer in place by halving: the order of additions
    depends on the row length only. Returns the row sums (a column view)."""
    n = work.shape[1]
    while n > 1:
        half = n // 2
        np.add(work[:, :half], work[:, half : 2 * half], out=work[:, :half])
        if n % 2:
            work[:, half] = work[:, n - 1]
            n = half + 1
        else:
            n = half
    return work[:, 0]


Leaf = Callable[[np.ndarray, np.ndarray | None, np.ndarray], None]
"""Writes a block's terms (float64) into the scratch view, from one or two input blocks."""


def _reduce(leaf: Leaf, a: np.ndarray, b: np.ndarray | None = None) -> float:
    flat_a = a.reshape(-1)
    flat_b = None if b is None else b.reshape(-1)
    n = flat_a.size
    if n == 0:
        return 0.0
    (buf,) = scratch(1, _F64, CHUNK)
    partials = np.empty(-(-n // BLOCK), dtype=np.float64)
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        view = buf[: hi - lo]
        leaf(flat_a[lo:hi], None if flat_b is None else flat_b[lo:hi], view)
        whole = (hi - lo) // BLOCK
        first = lo // BLOCK
        if whole:
            partials[first : first + whole] = _halve(view[: whole * BLOCK].reshape(whole, BLOCK))
        if whole * BLOCK < hi - lo:  # the last block of the tensor, shorter
            partials[first + whole] = _halve(view[whole * BLOCK :].reshape(1, -1))[0]
    return float(_halve(partials.reshape(1, -1))[0])


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


def total(a: np.ndarray) -> float:
    """The sum of ``a``'s elements, in float64."""
    return _reduce(_copy, a)


def abs_total(a: np.ndarray) -> float:
    """The sum of ``|a|``, in float64 (the 1-norm)."""
    return _reduce(_abs, a)


def sum_of_squares(a: np.ndarray) -> float:
    """The sum of ``a * a``, in float64 (the squared 2-norm)."""
    return _reduce(_product, a)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of two arrays of the same size, in float64."""
    if a.size != b.size:
        raise ValueError(f"dot of arrays of sizes {a.size} and {b.size}")
    return _reduce(_product, a, b)


def norm2(a: np.ndarray) -> float:
    """The 2-norm, in float64 (round it to the tensor's dtype as torch returns it)."""
    return float(np.sqrt(sum_of_squares(a)))
