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
from functools import lru_cache
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
        and array.size >= _VECTORIZED_FROM
        and bool(np.isfinite(array).all())
    ):
        return _float32_text(array)
    return json.dumps(array.tolist()).encode()


_VECTORIZED_FROM = 64
"""Below this many elements ``repr`` per element is cheaper than the fixed cost of the
vectorized formatter (it writes float32 values with up to 17 digits; they parse back
exactly all the same)."""
_BASE_WIDTH = 15  # sign, d, '.', 8 digits, then "e±XX"
_U64 = np.uint64
_ASCII_ZEROS = _U64(0x3030303030303030)
_LANES_100 = _U64(0x0000007F0000007F)
_LANES_10 = _U64(0x000F000F000F000F)
_EXPONENTS = np.array(
    [int.from_bytes(f"e{e:+03d}".encode(), "little") for e in range(-64, 64)], dtype=np.uint32
)
"""``"e-45"`` .. ``"e+38"`` as four ASCII bytes in one uint32, indexed by exponent + 64."""


def _eight_digits(values: np.ndarray) -> np.ndarray:
    """ASCII of integers below 1e8, zero-padded to 8 digits, packed into one uint64 each.

    SWAR: split into two 4-digit lanes of 32 bits, each into two 2-digit lanes of 16 bits,
    each into two 1-digit bytes. Division by 100 and by 10 are multiply-and-shift, exact
    in these ranges (x * 5243 >> 19 = x // 100 for x < 10^4; x * 103 >> 10 = x // 10 for
    x < 100), and no lane's product reaches the next lane. Little-endian byte order puts
    the most significant digit first.
    """
    high = values // _U64(10000)
    lanes = high | ((values - high * _U64(10000)) << _U64(32))
    quotient = ((lanes * _U64(5243)) >> _U64(19)) & _LANES_100
    lanes = quotient | ((lanes - quotient * _U64(100)) << _U64(16))
    quotient = ((lanes * _U64(103)) >> _U64(10)) & _LANES_10
    lanes = quotient | ((lanes - quotient * _U64(10)) << _U64(8))
    ascii_digits: np.ndarray = lanes | _ASCII_ZEROS
    return ascii_digits


@lru_cache(maxsize=64)
def _layout(shape: tuple[int, ...]) -> np.ndarray:
    """The fixed characters of a float32 text of this shape: brackets, '.', commas, blanks.

    Every element gets ``ndim`` bytes for opening brackets and ``ndim`` for closing ones,
    blank where none belongs: JSON allows the whitespace, and fixed widths let the whole
    text be one uint8 matrix.
    """
    n, ndim = math.prod(shape), len(shape)
    width = _BASE_WIDTH + 2 * ndim + 1
    text = np.full((n, width), ord(" "), dtype=np.uint8)
    text[:, ndim + 2] = ord(".")
    index = np.arange(n)
    for axis in range(ndim):
        block = math.prod(shape[axis:])
        text[index % block == 0, axis] = ord("[")
        text[(index + 1) % block == 0, width - 2 - axis] = ord("]")
    text[:, -1] = ord(",")
    text.setflags(write=False)
    return text


def _float32_text(array: np.ndarray) -> bytes:
    """Each element as ``[-| ]d.dddddddde±XX``: nine significant digits, exact for float32.

    The decimal digits come from float64 arithmetic on the float32 value (exact), the
    text from a handful of whole-array operations; a per-element ``repr`` would cost
    several times the optimizer step for small tensors.
    """
    flat = array.reshape(-1).astype(np.float64)
    n, ndim = flat.size, array.ndim
    magnitude = np.abs(flat)
    zero = magnitude == 0
    magnitude[zero] = 1.0
    exponent = np.floor(np.log10(magnitude))
    mantissa = np.rint(magnitude * np.power(10.0, 8.0 - exponent))
    # log10 can land one decade off near exact powers of ten; fix those few.
    high = mantissa >= 1e9
    low = mantissa < 1e8
    if high.any() or low.any():
        exponent += high
        exponent -= low
        mantissa = np.rint(magnitude * np.power(10.0, 8.0 - exponent))
    mantissa[zero] = 0.0
    exponent[zero] = 0.0
    leading = np.floor(mantissa * 1e-8)
    rest = (mantissa - leading * 1e8).astype(np.uint64)
    text = _layout(array.shape).copy()
    number = text[:, ndim : ndim + _BASE_WIDTH]
    number[:, 0] = np.where(np.signbit(flat), ord("-"), ord(" "))
    number[:, 1] = leading + ord("0")
    number[:, 3:11] = _eight_digits(rest).view(np.uint8).reshape(n, 8)
    number[:, 11:15] = _EXPONENTS[exponent.astype(np.intp) + 64].view(np.uint8).reshape(n, 4)
    return text.tobytes()[:-1]
