"""bfloat16 arithmetic as torch does it on the CPU, emulated in float32 numpy arrays.

numpy has no bfloat16. A bfloat16 number is a float32 whose low 16 bits are zero, so
bfloat16 tensors are kept here as float32 arrays holding only such values, and every
operation rounds its float32 result back to bfloat16 the way torch's kernels do: compute
in float32 ("opmath"), round to nearest even once at the end.

Matrix products follow torch's CPU reference GEMM, which torch uses when ``m * n * k`` is
at most ``16**3``: each output accumulates its exact float32 products in four interleaved
float32 partial sums (``l % 4``), leftovers going to the first, and adds the partial sums
in order; ``addmm`` then computes ``beta * c + alpha * dot`` as a fused multiply-add.
Reproducing that order makes small products bit-exact. Larger products go to oneDNN in
torch, whose blocking depends on the CPU; there a float32 BLAS product is used, which
agrees with it to within a bfloat16 rounding on a few elements.
"""

from __future__ import annotations

import numpy as np

from service.core import reductions

REFERENCE_GEMM_MAX = 16 * 16 * 16
"""torch hands bfloat16 products with m * n * k above this to oneDNN."""

_ROUNDING_BIAS = np.uint32(0x7FFF)
_HIGH_HALF = np.uint32(0xFFFF0000)


def round_(x: np.ndarray) -> np.ndarray:
    """Round a float32 array to bfloat16 values in place (nearest, ties to even)."""
    if x.dtype != np.float32:
        raise TypeError(f"bfloat16 rounding works on float32 arrays, got {x.dtype}")
    bits = x.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the
    # dropped half is above the midpoint, or at it with an odd kept half.
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    lowest_kept += _ROUNDING_BIAS
    # inf and nan are left alone: masking a nan's payload could turn it into inf.
    finite = np.isfinite(x)
    np.add(bits, lowest_kept, out=bits, where=finite)
    np.bitwise_and(bits, _HIGH_HALF, out=bits, where=finite)
    return x


def from_array(a: np.ndarray) -> np.ndarray:
    """``a.bfloat16()``: float64 goes through float32 first, as torch converts it."""
    return round_(np.array(a, dtype=np.float32, copy=True))


def _reference_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with torch's reference-GEMM float32 accumulation order."""
    m, k = a.shape
    n = b.shape[1]
    # Products of bfloat16 values are exact in float32; only the sums round.
    products = a[:, None, :] * b.T[None, :, :]
    main = k - k % 4
    partial = np.zeros((m, n, 4), dtype=np.float32)
    if main:
        by_lane = products[:, :, :main].reshape(m, n, main // 4, 4)
        # cumsum accumulates strictly in order, as each partial sum does in torch.
        partial = np.cumsum(by_lane, axis=2, dtype=np.float32)[:, :, -1, :]
    first = partial[:, :, 0].copy()
    for tail in range(main, k):
        first += products[:, :, tail]
    return ((first + partial[:, :, 1]) + partial[:, :, 2]) + partial[:, :, 3]


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m, k = a.shape
    n = b.shape[1]
    if m * n == 1:
        # A single dot product; torch's result is the float32 rounding of the exact sum
        # far more often than of any float32 accumulation order.
        return np.full((1, 1), reductions.dot(a, b), dtype=np.float32)
    if m * n * k <= REFERENCE_GEMM_MAX:
        return _reference_dot(a, b)
    return np.asarray(a @ b, dtype=np.float32)


def addmm(
    c: np.ndarray | None, a: np.ndarray, b: np.ndarray, beta: float, alpha: float
) -> np.ndarray:
    """``torch.addmm(c, a, b, beta=beta, alpha=alpha)`` on bfloat16 values; ``c=None`` is mm.

    ``alpha`` and ``beta`` are rounded to float32 as torch's kernel takes them.
    """
    alpha32, beta32 = np.float32(alpha), np.float32(beta)
    out = _dot(a, b)
    if alpha32 != 1:
        out *= alpha32
    if c is not None and beta32 != 0:
        # beta * c + alpha * dot, fused: exact in float64, then one float32 rounding.
        fused = c.astype(np.float64)
        fused *= np.float64(beta32)
        fused += out
        out = fused.astype(np.float32)
    return round_(out)


def frobenius_norm(x: np.ndarray) -> np.float32:
    """``x.norm()`` of a bfloat16 matrix: accumulated in float, rounded to bfloat16."""
    value = np.array([reductions.norm2(x)], dtype=np.float32)
    return np.float32(round_(value)[0])
