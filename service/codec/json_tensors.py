"""Tensors as JSON: nested lists of numbers in, nested lists of numbers out.

Decoding takes parsed JSON (see :func:`parse`) and builds one numpy array per tensor
without a per-element Python loop, rejecting anything that is not a list of numbers shaped
like the tensor (a flat list of the right length is accepted too).

Parsing and writing JSON text go through pydantic-core (Rust; already a dependency through
pydantic), which handles a list of a thousand floats four to five times faster than the
standard library: for small tensors that is most of the cost of a step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic_core import from_json, to_json

from service.codec.errors import InvalidValues

_NUMERIC_KINDS = frozenset("iuf")


def parse(text: bytes) -> Any:
    """JSON text to Python values, with NaN and Infinity accepted as ``json`` accepts them.

    Raises ``ValueError`` for anything that is not JSON (including nesting deeper than 200).
    """
    return from_json(text, allow_inf_nan=True, cache_strings="keys")


_LETTER_SCAN_MAX = 32
"""Occurrences of a letter worth checking one by one before one substring scan is cheaper."""


def may_hold_bools(text: bytes) -> bool:
    """Whether JSON ``text`` could hold ``true`` or ``false``: False only if neither word
    is in it. numpy would take a boolean for 0 or 1, so a text that may hold one is
    checked value by value (:func:`contains_bool`).

    Each word is looked for where its middle letter is (``u``, ``l``): numbers, ``NaN``
    and ``Infinity`` have neither, so in a step's body they occur only in names, and a
    byte search for one letter runs 20-30 times faster than one for a word (1k floats:
    0.6 against 23 us, most of the cost of parsing them)."""
    for letter, word in ((b"u", b"true"), (b"l", b"false")):
        at = text.find(letter)
        for _ in range(_LETTER_SCAN_MAX):
            if at == -1:
                break
            if at >= 2 and text[at - 2 : at - 2 + len(word)] == word:
                return True
            at = text.find(letter, at + 1)
        else:
            if word in text:
                return True
    return False


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


_NONFINITE_TEXT = ((b'"Infinity"', b'"inf"'), (b'"-Infinity"', b'"-inf"'), (b'"NaN"', b'"nan"'))


def array_to_json(array: np.ndarray) -> bytes:
    """JSON text for ``array`` as nested lists to its shape.

    Floats are written as the shortest text that parses back to the same float64, which
    for a float32 value is that value exactly. pydantic-core's serializer (Rust) does this
    several times faster than ``json.dumps``. A non-finite element (an update that
    overflowed) is the string ``"inf"``, ``"-inf"`` or ``"nan"``, as everywhere in
    optserve's JSON (:mod:`service.codec.strict_json`).
    """
    text = to_json(array.tolist(), inf_nan_mode="strings")
    if b'"' in text:  # numbers only, unless something is not finite
        for written, ours in _NONFINITE_TEXT:
            text = text.replace(written, ours)
    return text
