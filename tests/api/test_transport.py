"""The gathering transport: one writelines per loop iteration, nothing lost on close; the
protocol the event loop sees."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.api.server import BufferedFront, GatheringTransport, http_protocol


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls.append(("writelines", list(chunks)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_in_one_iteration_go_out_together_and_close_flushes() -> None:
    async def scenario() -> list[tuple[str, Any]]:
        recorder = Recorder()
        transport = GatheringTransport(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"")
        transport.write(b"body")
        assert recorder.calls == []  # nothing until the loop turns
        await asyncio.sleep(0)
        transport.writelines([b"next", b"one"])
        transport.close()
        await asyncio.sleep(0)
        assert transport.get_extra_info("peername") == "info:peername"
        return recorder.calls

    assert asyncio.run(scenario()) == [
        ("writelines", [b"HTTP/1.1 200 OK\r\n\r\n", b"body"]),
        ("writelines", [b"next", b"one"]),
        ("close", None),
    ]


def test_nothing_is_written_to_a_closing_transport() -> None:
    async def scenario() -> list[tuple[str, Any]]:
        recorder = Recorder()
        transport = GatheringTransport(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"late")
        recorder.closing = True
        await asyncio.sleep(0)
        return recorder.calls

    assert asyncio.run(scenario()) == []


def test_the_protocol_is_buffered_in_front_of_the_guarded_httptools_one() -> None:
    factory = http_protocol()
    if factory == "auto":
        pytest.skip("httptools is not installed: uvicorn picks its own protocol")
    config = uvicorn.Config(app=lambda scope, receive, send: None, http=factory)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        made = factory(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    finally:
        loop.close()
    # uvloop reads into a protocol's own buffers only if it is not an asyncio.Protocol.
    assert isinstance(made, BufferedFront)
    assert isinstance(made, asyncio.BufferedProtocol)
    assert not isinstance(made, asyncio.Protocol)
    assert type(made.inner).__name__ == "GuardedHttpToolsProtocol"
