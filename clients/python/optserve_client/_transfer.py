"""Moving tensor bytes through httpx without its copies: uploads from the arrays' memory,
replies read into one buffer.

A request body given to httpx as ``bytes`` must first be joined from the header and the
tensors (a full-size copy); given as these uploads it is sent from views of the arrays, in
slices small enough that the one copy h11 makes of each stays in the CPU's cache. A reply
read with ``response.read()`` is joined from its chunks; read here, each chunk is copied
once into a buffer of the reply's ``Content-Length`` (a reused one, :mod:`._buffers`), and
the arrays decoded from it are views of that buffer (no further copy).

That is the path through any httpx transport. The client's own (:mod:`._sockets`) does
better for a request marked :class:`Bulk`: it sends the parts themselves and reads the
reply into its buffer straight from the socket, handing it over as a :class:`ReadBody`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from optserve_client._buffers import reply_buffer
from optserve_client.errors import ProtocolError

Parts = Sequence[bytes | memoryview]
SLICE = 1 << 18
"""Bytes handed to httpx at a time: h11 copies each slice once (into one ``bytes``), and
256 KiB stays in the CPU's cache for that copy while costing a quarter of 64 KiB's trips
through httpcore (a 4 MB upload measured 2.9 ms in 64 KiB slices, 1.8 ms in 256 KiB ones,
1.7 ms in 1 MiB ones)."""
JOINED_MAX = 1 << 16
"""Bodies smaller than this are sent joined (see :func:`request_content`)."""
MIN_BUFFERED = 1 << 16
"""Replies smaller than this are read the ordinary way: nothing to save."""


def content_length(parts: Parts) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def _slices(parts: Parts) -> Iterator[bytes | memoryview]:
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, view.nbytes, SLICE):
            yield view[start : start + SLICE]


class Upload:
    """A request body of ``parts`` (``length`` bytes), re-iterable (each retry sends it
    again)."""

    def __init__(self, parts: Parts, length: int) -> None:
        self.parts = parts
        self.length = length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return _slices(self.parts)


class AsyncUpload:
    """:class:`Upload` for ``httpx.AsyncClient``, which takes only async iterables."""

    def __init__(self, parts: Parts, length: int) -> None:
        self.parts = parts
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        for piece in _slices(self.parts):
            yield piece


BULK = "optserve.bulk"
"""The request extension that marks a :class:`Bulk` request (read by ``_sockets``)."""
REPLY = "optserve.reply"
"""The response extension holding a :class:`ReadBody` (set by ``_sockets``)."""


class ReadBody:
    """A reply body already read into one buffer, handed out once.

    Once taken, the response no longer refers to the buffer: httpx's response and its
    stream refer to each other, so whatever a response holds lives until the garbage
    collector runs, and a reply buffer held so could not be reused (``_buffers``)."""

    def __init__(self, view: memoryview) -> None:
        self._view: memoryview | None = view

    def take(self) -> memoryview | None:
        view, self._view = self._view, None
        return view


@dataclass(frozen=True)
class Bulk:
    """A request whose bytes the client's transport moves itself (``_sockets``)."""

    parts: Parts | None
    """The body, sent from these buffers; None for the request's own (small) content."""
    media_type: str
    """A successful reply of this type is read into one buffer; "" for none."""


def tensor_reply_buffer(headers: httpx.Headers, media_type: str) -> memoryview | None:
    """A buffer for a reply's body, or None where it is read the ordinary way: no
    length, a small or encoded body, or a type other than ``media_type``."""
    length = headers.get("content-length", "")
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if (
        not length.isdigit()
        or int(length) < MIN_BUFFERED
        or kind != media_type
        or "content-encoding" in headers
    ):
        return None
    return reply_buffer(int(length))


class _Filling:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.filled = 0

    def take(self, chunk: bytes) -> None:
        end = self.filled + len(chunk)
        if end > self.view.nbytes:
            raise ProtocolError("reply is longer than its Content-Length")
        self.view[self.filled : end] = chunk
        self.filled = end

    def done(self) -> memoryview:
        if self.filled != self.view.nbytes:
            raise ProtocolError("reply is shorter than its Content-Length")
        return self.view


def _taken(response: httpx.Response) -> memoryview | None:
    """The reply the client's transport read into one buffer, if it did (handed out once)."""
    read = response.extensions.get(REPLY)
    return read.take() if isinstance(read, ReadBody) else None


def read_reply(response: httpx.Response, media_type: str) -> bytes | memoryview:
    """The body of a streamed ``response``: in one buffer when of ``media_type``."""
    taken = _taken(response)
    if taken is not None:
        return taken
    view = tensor_reply_buffer(response.headers, media_type)
    if view is None:
        return response.read()
    filling = _Filling(view)
    for chunk in response.iter_raw():
        filling.take(chunk)
    return filling.done()


async def aread_reply(response: httpx.Response, media_type: str) -> bytes | memoryview:
    """:func:`read_reply` for an ``httpx.AsyncClient`` response."""
    taken = _taken(response)
    if taken is not None:
        return taken
    view = tensor_reply_buffer(response.headers, media_type)
    if view is None:
        return await response.aread()
    filling = _Filling(view)
    async for chunk in response.aiter_raw():
        filling.take(chunk)
    return filling.done()


def request_content(parts: bytes | Parts | None, sync: bool) -> Any:
    """What httpx takes as ``content=`` for a body of ``bytes`` or of ``parts``.

    A body under :data:`JOINED_MAX` is joined (a copy of a few KiB): sent in parts it would
    cost a system call and a segment per part, which made a 1k-parameter step 2-3% slower
    (1.43 against 1.40 ms, steps alternating in one run; five runs alike)."""
    if parts is None or isinstance(parts, bytes):
        return parts
    length = content_length(parts)
    if length < JOINED_MAX:
        return b"".join(parts)
    return Upload(parts, length) if sync else AsyncUpload(parts, length)
