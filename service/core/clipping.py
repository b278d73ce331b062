"""Gradient clipping with torch.nn.utils' formulas, applied in place before the update."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from service.core import reductions


def _norm(values: np.ndarray, norm_type: float) -> np.floating[Any]:
    """One tensor's p-norm, rounded to the tensor's dtype like torch.linalg.vector_norm.

    Sums go through :mod:`service.core.reductions` (float64, an order fixed by the
    length), so a replay on another machine computes the same norm; the max is exact in
    any order.
    """
    flat = values.reshape(-1)
    # torch sums in the tensor's dtype: a sum that passes its largest value is inf there,
    # though the float64 sum (and its root) would still fit.
    largest = float(np.finfo(flat.dtype).max)
    if flat.size == 0:
        value: Any = 0.0
    elif math.isinf(norm_type):
        value = np.max(np.abs(flat))
    elif norm_type == 2.0:
        return _norm_of_squares(reductions.sum_of_squares(flat), flat.dtype)
    elif norm_type == 1.0:
        value = reductions.abs_total(flat)
    else:
        # numpy's power is a SIMD loop chosen by CPU features (AVX-512 rounds some
        # results differently): replicas pin those features (docs/storage.md).
        powers = np.abs(flat).astype(np.float64) ** norm_type
        summed = reductions.total(powers)
        value = math.inf if summed > largest else summed ** (1.0 / norm_type)
    return cast(np.floating[Any], flat.dtype.type(value))


def _norm_of_squares(squares: float, dtype: np.dtype[Any]) -> np.floating[Any]:
    """A tensor's 2-norm from its sum of squares, as :func:`_norm` rounds it."""
    # torch sums in the tensor's dtype: a sum that passes its largest value is inf there.
    value = math.inf if squares > float(np.finfo(dtype).max) else math.sqrt(squares)
    return cast(np.floating[Any], dtype.type(value))


def total_norm_of_squares(squares: Sequence[float], dtype: np.dtype[Any]) -> np.floating[Any]:
    """``total_norm(grads, 2.0)`` from each tensor's sum of squares."""
    norms = np.array([_norm_of_squares(s, dtype) for s in squares], dtype=dtype)
    return _norm(norms, 2.0)


def total_norm(grads: Sequence[np.ndarray], norm_type: float) -> np.floating[Any]:
    """The norm of the per-tensor norms, as ``torch.nn.utils.get_total_norm`` computes it."""
    dtype = grads[0].dtype
    norms = np.array([_norm(g, norm_type) for g in grads], dtype=dtype)
    return _norm(norms, norm_type)


def clip_grad_norm(grads: Sequence[np.ndarray], max_norm: float, norm_type: float) -> float:
    """Scale ``grads`` in place by ``min(max_norm / (total_norm + 1e-6), 1)``; return the norm.

    Like torch, the scale is applied even when it is 1, and it is computed in the gradients'
    dtype so float32 sessions round exactly where torch rounds.
    """
    dt = grads[0].dtype.type
    # Huge gradients overflow the norm to inf, and the scaled gradients to NaN, as in torch.
    with np.errstate(over="ignore", invalid="ignore"):
        norm = total_norm(grads, norm_type)
        coef = min(dt(max_norm) / (norm + dt(1e-6)), dt(1.0))
        for g in grads:
            g *= coef
    return float(norm)


def clip_grad_value(grads: Sequence[np.ndarray], clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place."""
    for g in grads:
        np.clip(g, -clip_value, clip_value, out=g)
