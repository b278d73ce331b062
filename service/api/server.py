"""uvicorn's httptools protocol, with one system call per response and guards on connections.

Gathering writes: uvicorn writes a response's status line and headers, then its body, as
two transport writes: two system calls and, with TCP_NODELAY, two TCP segments that wake
the client twice. Here the writes made within one event-loop iteration are gathered and
handed to the transport as one ``writelines`` (one ``writev``). For a small step reply
that is a measurable share of the server's time per request.

Guards, which uvicorn lacks:

- a header timeout: a connection must deliver a request's headers within
  ``header_timeout_s`` of connecting or of the request's first byte, or it is closed
  (with a 408 if part of a request had arrived);
- a cap on idle keep-alive connections (answered, waiting for their next request): past
  ``max_idle_connections``, the one idle longest is closed (a connection that has sent
  nothing yet is the header timeout's);
- a lingering close: when the server closes a connection whose request is still arriving
  (a 413 or 408 mid-body), it sends its answer and a FIN, then reads and drops what the
  client still sends for up to :data:`LINGER_S`. Closing at once would answer the
  unread bytes with a reset, which can destroy the answer before the client reads it.

Bodies in place: the protocol is an ``asyncio.BufferedProtocol``. It reads the socket into
a scratch buffer and feeds httptools from there, except for a body the app has asked to
receive in place (:mod:`service.api.in_place`): that one is read from the socket straight
into the app's buffer, and httptools, which never sees those bytes, is replaced by a fresh
parser for the connection's next request.

The body read timeout is the body reader's (``service/api/body.py``), and the keep-alive
timeout and the connection limit are uvicorn's own (``timeout_keep_alive``,
``limit_concurrency``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from service.api.in_place import EXTENSION, InPlace, Into

LINGER_S = 2.0
"""How long a closed connection still drains what its client sends."""

SCRATCH_BYTES = 256 * 1024
"""A connection's read buffer for what is not received in place (asyncio's own read size)."""


@dataclass(frozen=True)
class ConnectionGuards:
    header_timeout_s: float = 10.0
    max_idle_connections: int = 256


class GatheringTransport:
    """A transport proxy that batches ``write`` calls until the end of the loop iteration.

    ``linger`` says, at close, whether a request is still arriving: then the close is a
    lingering one (see the module's doc).
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        linger: Callable[[], bool] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._linger = linger
        self._closing = False

    def write(self, data: bytes) -> None:
        if not data or self._closing:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def close(self) -> None:
        self._flush()
        if self._closing:
            return
        self._closing = True
        if (
            self._linger is not None
            and self._linger()
            and not self._transport.is_closing()
            and self._transport.can_write_eof()
        ):
            self._transport.write_eof()
            # uvicorn may have paused reading (a full body buffer); drain from now on.
            self._transport.resume_reading()
            self._loop.call_later(LINGER_S, self._transport.close)
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _timeout_response() -> bytes:
    body = json.dumps(
        {
            "type": "/problems/header-timeout",
            "title": "Request headers timed out",
            "status": 408,
            "detail": "the request's headers did not arrive in time; the connection is closed",
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A request's declared body length; None for a chunked body or none declared."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.isdigit():
            length = int(value)
    return length


class BufferedFront(asyncio.BufferedProtocol):
    """The protocol the event loop sees: a ``BufferedProtocol`` in front of uvicorn's.

    uvicorn's protocol is an ``asyncio.Protocol``, and uvloop reads into a protocol's own
    buffers only if it is not one (asyncio only if it is a ``BufferedProtocol``): so the
    loop talks to this, and this hands everything to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer: memoryview = self.inner.get_buffer(sizehint)
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.buffer_updated(nbytes)


def http_protocol(guards: ConnectionGuards | None = None) -> Any:
    """The protocol factory for ``uvicorn.run(http=...)``: gathering writes, connection
    guards and bodies in place over httptools (:class:`BufferedFront` in front), or
    uvicorn's own choice when httptools is not installed."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    except ImportError:
        return "auto"
    limits = guards or ConnectionGuards()
    idle: OrderedDict[GuardedHttpToolsProtocol, None] = OrderedDict()
    """This server's idle keep-alive connections, longest idle first."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _receiving = False
        """A request has begun arriving and has not arrived whole."""
        _scratch: memoryview
        _in_place: InPlace | None = None
        """The body now read into the app's buffer (or, detached, read and dropped)."""
        _body_parsed = 0
        """Bytes of this request's body httptools has handed over."""
        _declared: int | None = None
        """This request's ``Content-Length``, if it has one (and is not chunked)."""
        _reads_into_buffers = False
        """The event loop reads through :meth:`get_buffer` (a loop that read otherwise would
        leave a body in place waiting forever: then none is offered)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._scratch = memoryview(bytearray(SCRATCH_BYTES))
            gathering = GatheringTransport(transport, self.loop, lambda: self._receiving)
            super().connection_made(cast(asyncio.Transport, gathering))
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            idle.pop(self, None)
            if self._in_place is not None:
                self._in_place.lose()
                self._in_place = None
            super().connection_lost(exc)

        def get_buffer(self, sizehint: int) -> memoryview:
            self._reads_into_buffers = True
            body = self._in_place
            if body is None:
                return self._scratch
            room = body.room()
            return self._scratch[: body.end - body.filled] if room is None else room

        def buffer_updated(self, nbytes: int) -> None:
            body = self._in_place
            if body is None:
                self.data_received(bytes(self._scratch[:nbytes]))
            elif body.arrived(nbytes):
                self._in_place = None
                # httptools still waits for the body it never saw: the connection's next
                # request starts on a fresh parser.
                self.parser = httptools.HttpRequestParser(self)
                with contextlib.suppress(AttributeError):  # httptools before 0.6.3
                    self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                self.on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return  # lingering: drain, never answer
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._receiving = True
            self._body_parsed = 0
            idle.pop(self, None)
            if self._header_timer is None:
                self._arm_header_timer()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()
            self._declared = _content_length(self.headers)
            # The app's task has been created, not yet run: it finds this in its scope.
            into: Into = functools.partial(self._receive_into, self.cycle)
            extensions: dict[str, Any] = cast(
                dict[str, Any], self.scope.setdefault("extensions", {})
            )
            extensions[EXTENSION] = into

        def on_body(self, body: bytes) -> None:
            self._body_parsed += len(body)
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._receiving = False
            super().on_message_complete()

        def on_response_complete(self) -> None:
            if self._in_place is not None:
                self._in_place.detach()  # the rest of the body is read and dropped
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._mark_idle()

        def _receive_into(
            self, cycle: RequestResponseCycle, view: memoryview, filled: int
        ) -> InPlace | None:
            """``into(view, filled)`` of :mod:`service.api.in_place`, for ``cycle``'s body."""
            pending = cycle.body  # handed over by httptools, not yet taken by the app
            if (
                not self._reads_into_buffers
                or cycle is not self.cycle
                or not self._receiving
                or self._in_place is not None
                or cycle.response_complete
                or cycle.disconnected
                or self.transport.is_closing()
                or len(view) != self._declared
                or filled + len(pending) != self._body_parsed
                or self._body_parsed >= len(view)
            ):
                return None
            view[filled : self._body_parsed] = pending
            cycle.body = type(pending)()
            self._in_place = InPlace(view, filled, self._body_parsed)
            self.flow.resume_reading()  # uvicorn pauses past its buffer's high-water mark
            return self._in_place

        def _mark_idle(self) -> None:
            idle[self] = None
            while len(idle) > limits.max_idle_connections:
                oldest, _ = idle.popitem(last=False)
                oldest.transport.close()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(
                limits.header_timeout_s, self._headers_timed_out
            )

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._receiving:
                self.transport.write(_timeout_response())
            self.transport.close()

    def protocol(*args: Any, **kwargs: Any) -> BufferedFront:
        return BufferedFront(GuardedHttpToolsProtocol(*args, **kwargs))

    return protocol
