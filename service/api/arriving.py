"""A step's gradient checks begun while its safetensors body is still arriving.

Core checks every gradient for NaN and Inf with one pass that also gives its sum of
squares (the grad norm). Done after the body has arrived, that pass streams the whole
body from memory again: 0.9 ms of a 1M-parameter float32 step. Done here, each row of a
gradient is summed as soon as it has arrived, while its bytes are still in the CPU's
cache from the socket read: the body takes about 0.3 ms longer to arrive and the check
afterwards costs nothing.

:class:`ArrivingGradSquares` watches the step's receive buffer
(:func:`service.api.body.receive_body`'s ``progress``), reads the safetensors header once
it is there, and feeds core's :class:`~service.core.reductions.ArrivingSquares` (the same
bits as the check's own pass). Only gradients read as views of the body qualify: float32
and float64 in the machine's byte order. The session uses a sum only for a gradient it
takes without a cast; anything else is checked after arrival as before, and a header that
does not parse is left for the decoder to refuse.
"""

from __future__ import annotations

import numpy as np

from service.api.wire import PARAMS_PREFIX
from service.codec import safetensors
from service.codec.errors import MalformedBody
from service.core.reductions import LANES, ArrivingSquares

MIN_ELEMENTS = 2 * LANES
"""Smaller gradients are summed by the check itself: their pass costs tens of
microseconds, less than following them here."""

_VIEWED = {label: np.dtype(f"<{code}") for label, code in (("F32", "f4"), ("F64", "f8"))}


class ArrivingGradSquares:
    """Each large gradient's sum of squares, by name, taken as a step body arrives."""

    def __init__(self) -> None:
        self._tensors: list[tuple[str, int, int, int, ArrivingSquares]] | None = None
        """Per gradient followed, in the body's order: name, first byte, end byte, item
        size, its running sum."""
        self._next = 0
        """The first of them not wholly arrived: a chunk costs the tensors it reaches."""
        self._given_up = False

    def progress(self, buffer: memoryview, filled: int) -> None:
        """The first ``filled`` bytes of ``buffer`` (the whole body's) are in place."""
        if self._tensors is None and not self._read_header(buffer, filled):
            return
        assert self._tensors is not None
        for _, begin, end, itemsize, squares in self._tensors[self._next :]:
            if filled <= begin:
                break
            squares.advance((min(filled, end) - begin) // itemsize)
            if filled < end:
                break
            self._next += 1

    def result(self, filled: int) -> dict[str, float]:
        """The sums of the gradients wholly among the body's first ``filled`` bytes."""
        if not self._tensors:
            return {}
        return {
            name: squares.result() for name, _, end, _, squares in self._tensors if end <= filled
        }

    def _read_header(self, buffer: memoryview, filled: int) -> bool:
        if self._given_up or filled < 8:
            return False
        start = safetensors.data_start(bytes(buffer[:8]))
        if start is None or start > filled:
            self._given_up = start is None
            return False
        try:
            entries, _, _ = safetensors.read_header(buffer[:start])
        except MalformedBody:
            self._given_up = True  # the decoder refuses it, with its own words
            return False
        tensors = []
        for entry in entries:
            dtype = _VIEWED.get(entry.dtype)
            if entry.name.startswith(PARAMS_PREFIX) or dtype is None or not dtype.isnative:
                continue
            begin, end = start + entry.begin, start + entry.end
            if (end - begin) // dtype.itemsize < MIN_ELEMENTS or end > len(buffer):
                continue
            array = np.frombuffer(buffer[begin:end], dtype=dtype)
            if array.flags.aligned:  # the decoder copies an unaligned one
                tensors.append((entry.name, begin, end, dtype.itemsize, ArrivingSquares(array)))
        self._tensors = sorted(tensors, key=lambda tensor: tensor[1])
        return True
