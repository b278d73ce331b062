"""uvicorn's httptools protocol, sending each response in one system call.

uvicorn writes a response's status line and headers, then its body, as two transport
writes: two system calls and, with TCP_NODELAY, two TCP segments that wake the client
twice. Here the writes made within one event-loop iteration are gathered and handed to the
transport as one ``writelines`` (one ``writev``). For a small step reply that is a
measurable share of the server's time per request.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast


class GatheringTransport:
    """A transport proxy that batches ``write`` calls until the end of the loop iteration."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
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
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def http_protocol() -> Any:
    """The protocol class for ``uvicorn.run(http=...)``: gathering writes over httptools, or
    uvicorn's own choice when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class GatheringHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            gathering = cast(asyncio.Transport, GatheringTransport(transport, self.loop))
            super().connection_made(gathering)

    return GatheringHttpToolsProtocol
