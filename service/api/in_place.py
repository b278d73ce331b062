"""A request body received from the socket straight into a buffer of the app's.

Through ASGI a body arrives as ``bytes`` messages, and under uvicorn each 64 KiB of it is
copied four times on its way there (the socket read, httptools' callback, the cycle's
``bytearray``, the message's ``bytes``), with the connection paused between messages. A
4 MB step body took 3.7 ms to arrive that way, where the bytes alone cross loopback in
about 1.2 ms.

So the server's protocol (:mod:`service.api.server`) is an ``asyncio.BufferedProtocol``
and offers each request one extension, :data:`EXTENSION`: a call ``into(view, filled)``
with which the app hands over the buffer the body is going to (``view``, exactly the
declared ``Content-Length``) once it has taken ``filled`` bytes of it from messages. From
then on the event loop reads the socket into ``view`` itself, and the app waits on the
returned :class:`InPlace` for the bytes to be there. This is beyond the ASGI contract: the
extension is optserve's own, and an app or a server without it reads messages as before.

The protocol stops writing into ``view`` as soon as the request's response is complete or
its connection is lost (the rest of the body is read and dropped), and it holds ``view``
until then, which keeps the buffer from being handed out again
(:class:`service.buffers.BufferPool` reuses only a buffer nothing refers to).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.requests import ClientDisconnect

EXTENSION = "optserve.body_in_place"
"""The scope extension under which the protocol offers ``into(view, filled)``."""

Into = Callable[[memoryview, int], "InPlace | None"]
"""``into(view, filled)``: receive the rest of the body into ``view[filled:]``; None where
the protocol cannot (the body has arrived, the response is sent, the connection is gone,
or ``filled`` is not where the body stands)."""


class InPlace:
    """A body arriving into ``view``: ``filled`` bytes of it are there, the first ``start``
    of them put there by the app from messages, the rest by the protocol."""

    def __init__(self, view: memoryview, start: int, filled: int) -> None:
        self.view: memoryview | None = view
        self.start = start
        self.filled = filled
        self.end = len(view)
        self._lost = False
        self._changed = asyncio.Event()

    async def wait(self, seen: int) -> int:
        """Wait until more than ``seen`` bytes are in place; how many are.

        Raises :class:`ClientDisconnect` if the connection is lost first."""
        while self.filled <= seen and not self._lost:
            await self._changed.wait()
            self._changed.clear()
        if self._lost:
            raise ClientDisconnect()
        return self.filled

    # -- the protocol's side -----------------------------------------------------------

    def room(self) -> memoryview | None:
        """Where the next bytes go; None once the app's buffer is no longer to be written."""
        return None if self.view is None else self.view[self.filled :]

    def arrived(self, nbytes: int) -> bool:
        """``nbytes`` more were read; whether the body is now whole."""
        self.filled += nbytes
        self._changed.set()
        return self.filled >= self.end

    def detach(self) -> None:
        """Write no more into the app's buffer (its response is complete)."""
        self.view = None

    def lose(self) -> None:
        """The connection is gone: wake the app, write nothing more."""
        self.view = None
        self._lost = True
        self._changed.set()
