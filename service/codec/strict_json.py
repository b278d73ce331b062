"""JSON every language parses: non-finite floats written as the strings ``"inf"``, ``"-inf"``
and ``"nan"``.

``NaN`` and ``Infinity`` are not JSON (RFC 8259): Python's ``json`` writes them, but
JavaScript's ``JSON.parse``, Go's ``encoding/json`` and most other parsers refuse the whole
document. Every JSON text optserve answers with goes through :func:`dumps`, which writes
an infinite or NaN value as the string Python's ``str(float)`` gives it (and ``float()``
reads back): an infinite clipping norm is ``"inf"``. Requests may still use the tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""The strings that stand for non-finite floats, and their values."""


def finite_floats(value: Any) -> Any:
    """``value`` with every non-finite float (inside dicts, lists, tuples) as its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {k: finite_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_floats(v) for v in value]
    return value


def nonfinite_floats(value: Any) -> Any:
    """The inverse of :func:`finite_floats`: ``"inf"``, ``"-inf"`` and ``"nan"`` as floats.

    Only for documents where those strings cannot mean anything else (a checkpoint's
    state: its strings are names such as an LBFGS phase or a schedule's mode).
    """
    if isinstance(value, str):
        return NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: nonfinite_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nonfinite_floats(v) for v in value]
    return value


def dumps(
    value: Any,
    *,
    separators: tuple[str, str] = (",", ":"),
    default: Callable[[Any], Any] | None = None,
) -> str:
    """Strict JSON text for ``value`` (``default`` as in ``json.dumps``)."""
    return json.dumps(finite_floats(value), separators=separators, default=default, allow_nan=False)
