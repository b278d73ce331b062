"""The largest body a step of a given session can need: its tensors twice plus a header.

A step carries at most every tensor's gradient and every tensor's value, so its body is
bounded by the session's shapes: anything larger can only be refused, and is, as soon as
the bytes pass the bound (or the declared ``Content-Length`` does), rather than at the
server-wide ``max_body_bytes`` after buffering all of it.

The bound is generous where clients differ: safetensors may carry float64 whatever the
session's dtype, and JSON numbers are counted at 64 bytes each (a float64's shortest
round-trip text is at most 24 characters; the rest is room for separators, brackets and
indentation).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from service.api.media import Wire

HEADER_ALLOWANCE = 64 * 1024
"""Room for a body's fixed parts: the JSON keys and loss, or safetensors' metadata."""
PER_TENSOR_ALLOWANCE = 256
"""Room per tensor entry beyond its name and shape (quotes, dtype, offsets, brackets)."""
PER_DIMENSION_ALLOWANCE = 24
"""Room per dimension of a tensor's shape in a safetensors header."""
BYTES_PER_ELEMENT = {Wire.JSON: 64, Wire.SAFETENSORS: 8}
COPIES = 2
"""A gradient and a value per tensor."""
_CACHED = 4096


def step_body_bound(tensors: Mapping[str, Mapping[str, Any]], wire: Wire) -> int:
    """The most bytes a step body in ``wire`` can take for a session with ``tensors``
    (name -> ``{"shape": [...]}``, as in the session document)."""
    per_element = BYTES_PER_ELEMENT[wire]
    total = HEADER_ALLOWANCE
    for name, spec in tensors.items():
        shape = spec["shape"]
        entry = len(name) + PER_TENSOR_ALLOWANCE + PER_DIMENSION_ALLOWANCE * len(shape)
        total += COPIES * (entry + per_element * math.prod(shape))
    return total


class StepBodyBounds:
    """:func:`step_body_bound` per session, remembered: a session's tensors are one
    mapping for as long as they stay the same, so the sum runs once, not per step."""

    def __init__(self) -> None:
        self._known: OrderedDict[tuple[int, Wire], tuple[Mapping[str, Any], int]] = OrderedDict()

    def bound(self, tensors: Mapping[str, Mapping[str, Any]], wire: Wire) -> int:
        key = (id(tensors), wire)
        found = self._known.get(key)
        # The entry keeps its mapping alive, so its id cannot be reused by another.
        if found is not None and found[0] is tensors:
            return found[1]
        value = step_body_bound(tensors, wire)
        self._known[key] = (tensors, value)
        if len(self._known) > _CACHED:
            self._known.popitem(last=False)
        return value
