"""Tensors as JSON: nested lists of numbers in, nested lists of numbers out.

Decoding takes what ``json.loads`` produced and builds one numpy array per tensor without
a per-element Python loop, rejecting anything that is not a list of numbers shaped like
the tensor (a flat list of the right length is accepted too). Encoding writes JSON text
directly: float32 arrays go through a vectorized formatter (nine significant digits, which
round-trip every float32 exactly) because ``float.__repr__`` per element costs more than
the optimizer step itself for small tensors; other dtypes use ``repr`` via ``json``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from service.codec.errors import InvalidValues

_NUMERIC_KINDS = frozenset("iuf")


def contains_bool(value: Any) -> bool:
    """Whether a parsed JSON value holds ``true`` or ``false`` anywhere inside lists."""
    if isinstance(value, list):
        return any(contains_bool(item) for item in value)
    return isinstance(value, bool)


def array_from_json(
    value: Any,
    shape: tuple[int, ...] | None,
    dtype: np.dtype[Any],
    field: str,
    *,
    check_bools: bool = True,
) -> np.ndarray:
    """Build a new ``dtype`` array from JSON ``value``, shaped ``shape`` when given.

    ``check_bools=False`` skips the scan for JSON booleans (which numpy would silently turn
    into 0 and 1) when the caller knows the raw text holds no ``true``/``false`` at all.
    Raises :class:`InvalidValues` naming ``field``.
    """
    if isinstance(value, bool) or not isinstance(value, list | int | float):
        raise InvalidValues(f"{field} must be a list of numbers", field=field)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidValues(
            f"{field} must be a list of numbers nested like the tensor's shape", field=field
        ) from None
    if array.dtype.kind not in _NUMERIC_KINDS or (check_bools and contains_bool(value)):
        raise InvalidValues(f"{field} must hold numbers only", field=field)
    if shape is not None and array.shape != shape:
        if array.ndim == 1 and array.size == math.prod(shape):
            array = array.reshape(shape)
        else:
            raise InvalidValues(
                f"{field} has shape {list(array.shape)}, expected {list(shape)} "
                f"(or a flat list of {math.prod(shape)} numbers)",
                field=field,
            )
    # Out-of-range values become inf, which the finiteness check then reports by name.
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(dtype, copy=False)  # a fresh array already: nothing aliases it


def array_to_json(array: np.ndarray) -> bytes:
    """JSON text for ``array`` as nested lists to its shape (NaN/Infinity as in ``json``)."""
    if (
        array.dtype == np.float32
        and array.ndim >= 1
        and array.size > 0
        and bool(np.isfinite(array).all())
    ):
        return _float32_text(array)
    return json.dumps(array.tolist()).encode()


_DIGIT_POWERS = 10.0 ** np.arange(8, -1, -1)
_BASE_WIDTH = 15  # sign, d, '.', 8 digits, 'e', exponent sign, 2 exponent digits
_ZERO, _SPACE, _MINUS, _PLUS, _DOT, _E = (ord(c) for c in "0 -+.e")


def _float32_text(array: np.ndarray) -> bytes:
    """Fixed-width ``[-| ]d.dddddddde±XX`` per element, brackets padded with spaces.

    Every element gets ``ndim`` bytes for opening brackets and ``ndim`` for closing ones,
    blank where none belongs: JSON allows the whitespace, and fixed widths let the whole
    text be assembled as one uint8 matrix.
    """
    flat = array.reshape(-1).astype(np.float64)
    n, ndim = flat.size, array.ndim
    magnitude = np.abs(flat)
    zero = magnitude == 0
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log10(np.where(zero, 1.0, magnitude))).astype(np.int64)
    mantissa = np.rint(magnitude * 10.0 ** (8 - exponent))
    # log10 can land one decade off at exact powers of ten; fix those few.
    high = mantissa >= 1e9
    low = (mantissa < 1e8) & ~zero
    if high.any() or low.any():
        exponent += high.astype(np.int64) - low.astype(np.int64)
        mantissa = np.rint(magnitude * 10.0 ** (8 - exponent))
    mantissa[zero] = 0
    exponent[zero] = 0
    # Float floor division is exact here (integers below 2**53) and much faster than int64;
    # each digit is its leading part minus ten times the previous column's.
    leading = np.floor(mantissa[:, None] / _DIGIT_POWERS)
    chars = leading.copy()
    chars[:, 1:] -= 10.0 * leading[:, :-1]
    chars += _ZERO
    width = _BASE_WIDTH + 2 * ndim + 1
    text = np.full((n, width), _SPACE, dtype=np.uint8)
    number = text[:, ndim : ndim + _BASE_WIDTH]
    number[:, 0] = np.where(np.signbit(flat), _MINUS, _SPACE)
    number[:, 1] = chars[:, 0]
    number[:, 2] = _DOT
    number[:, 3:11] = chars[:, 1:]
    number[:, 11] = _E
    number[:, 12] = np.where(exponent < 0, _MINUS, _PLUS)
    exponent = np.abs(exponent)
    tens = exponent // 10
    number[:, 13] = tens + _ZERO
    number[:, 14] = exponent - 10 * tens + _ZERO
    index = np.arange(n)
    for axis in range(ndim):
        block = math.prod(array.shape[axis:])
        text[index % block == 0, axis] = ord("[")
        text[(index + 1) % block == 0, width - 2 - axis] = ord("]")
    text[:, -1] = ord(",")
    return text.tobytes()[:-1]
