"""The client's transports (``Client``'s and ``AsyncClient``'s): bulk requests on keep-alive
sockets, against a scripted server.

Each test's server is a loopback socket that reads requests and answers with the bytes the
test scripts, so that closes, short bodies, chunked replies and silence can be staged.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from optserve_client import _sockets, _transfer
from optserve_client._calls import Call
from optserve_client._retry import RetryPolicy
from optserve_client._tries import Tries

OCTETS = "application/octet-stream"
Answer = Callable[[bytes, bytes], bytes | None]
"""From a request's head and body, the reply's bytes (None: close without answering)."""


class Scripted:
    """A loopback HTTP/1.1 server answering with ``answer``; counts its connections."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        return
                    data += chunk
                body, data = data[:length], data[length:]
                reply = self.answer(head, body)
                if reply is None:
                    return
                conn.sendall(reply)
                if self.close_after:
                    return

    def close_idle(self) -> None:
        for conn in self.open:
            conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@contextmanager
def scripted(answer: Answer, close_after: bool = False) -> Iterator[Scripted]:
    server = Scripted(answer, close_after)
    try:
        yield server
    finally:
        server.close()


def reply(body: bytes, kind: str = OCTETS, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n{extra}"
    return head.encode() + b"\r\n" + body


def digest_reply(_: bytes, body: bytes) -> bytes:
    """Answers with the request body's sha256 and then the body itself (a large reply)."""
    return reply(hashlib.sha256(body).digest() + body)


Post = Callable[..., httpx.Response]
"""``post(port, parts, media_type=OCTETS)``: POST ``parts`` as the client's calls go,
marked bulk (``Tries.request``), the reply read (into one buffer where it can be)."""


def _call(port: int, parts: list[bytes | memoryview]) -> Call:
    return Call("POST", f"http://127.0.0.1:{port}/step", {"content-type": OCTETS}, parts)


@contextmanager
def posting(kind: str, timeout: float = 5.0) -> Iterator[Post]:
    """:data:`Post` through the sync transport (``Client``'s) or the async one
    (``AsyncClient``'s, on one event loop for the whole test so that connections are
    kept between posts)."""
    if kind == "sync":
        with httpx.Client(transport=_sockets.SocketTransport(), timeout=timeout) as http:

            def post(
                port: int, parts: list[bytes | memoryview], media_type: str = OCTETS
            ) -> httpx.Response:
                request = Tries(_call(port, parts), RetryPolicy(), "").request(http, media_type)
                response = http.send(request, stream=True)
                if _transfer.REPLY not in response.extensions:
                    response.read()
                response.close()
                return response

            yield post
        return
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=_sockets.AsyncSocketTransport(), timeout=timeout)

    async def send(port: int, parts: list[bytes | memoryview], media_type: str) -> httpx.Response:
        request = Tries(_call(port, parts), RetryPolicy(), "").request(client, media_type)
        response = await client.send(request, stream=True)
        if _transfer.REPLY not in response.extensions:
            await response.aread()
        await response.aclose()
        return response

    def post_async(
        port: int, parts: list[bytes | memoryview], media_type: str = OCTETS
    ) -> httpx.Response:
        return loop.run_until_complete(send(port, parts, media_type))

    try:
        yield post_async
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def post(kind: str) -> Iterator[Post]:
    with posting(kind) as post:
        yield post


def large_parts() -> tuple[list[bytes | memoryview], bytes]:
    values = np.arange(1 << 20, dtype=np.float32)
    parts: list[bytes | memoryview] = [b"head-of-body", memoryview(values)]
    return parts, b"".join(parts)


def test_a_body_sent_from_its_parts_arrives_whole_and_the_reply_lands_in_one_buffer(
    post: Post,
) -> None:
    parts, joined = large_parts()
    with scripted(digest_reply) as server:
        response = post(server.port, parts)
    assert isinstance(response.extensions[_transfer.REPLY], _transfer.ReadBody)
    read = _transfer.read_reply(response, OCTETS)
    assert isinstance(read, memoryview)
    assert bytes(read[:32]) == hashlib.sha256(joined).digest()
    assert bytes(read[32:]) == joined


def test_a_reply_buffer_taken_from_a_response_is_reused_while_the_response_lives(
    post: Post,
) -> None:
    """httpx's response and its stream refer to each other (they live until the garbage
    collector runs): once its body is taken, a response holds no reference to it."""
    parts, _ = large_parts()
    gc.disable()
    try:
        with scripted(digest_reply) as server:
            first = post(server.port, parts)
            address = np.frombuffer(_transfer.read_reply(first, OCTETS), np.uint8).ctypes.data
            second = post(server.port, parts)
            again = np.frombuffer(_transfer.read_reply(second, OCTETS), np.uint8).ctypes.data
        assert again == address
        assert first.extensions[_transfer.REPLY].take() is None  # handed out once
    finally:
        gc.enable()


def test_steps_share_one_keep_alive_connection(post: Post) -> None:
    parts, joined = large_parts()
    with scripted(digest_reply) as server:
        for _ in range(3):
            read = _transfer.read_reply(post(server.port, parts), OCTETS)
            assert bytes(read[32:]) == joined
        assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_not_used_again(post: Post) -> None:
    parts, joined = large_parts()
    with scripted(digest_reply) as server:
        post(server.port, parts)
        server.close_idle()
        time.sleep(0.05)
        read = _transfer.read_reply(post(server.port, parts), OCTETS)
        assert bytes(read[32:]) == joined
        assert server.connections == 2


def test_a_reply_that_says_close_ends_its_connection(post: Post) -> None:
    def closing(head: bytes, body: bytes) -> bytes:
        return reply(b"x" * 100_000, extra="connection: close\r\n")

    with scripted(closing) as server:
        for _ in range(2):
            read = _transfer.read_reply(post(server.port, [b"a"]), OCTETS)
            assert bytes(read) == b"x" * 100_000
        assert server.connections == 2


def test_bytes_past_the_reply_end_the_connection(post: Post) -> None:
    def overlong(head: bytes, body: bytes) -> bytes:
        return reply(b"ok", kind="text/plain") + b"surplus"

    with scripted(overlong) as server:
        for _ in range(2):
            assert post(server.port, [b"a"]).content == b"ok"
        assert server.connections == 2


def test_a_reply_cut_short_is_a_protocol_error(post: Post) -> None:
    def short(head: bytes, body: bytes) -> bytes:
        return reply(b"y" * 200_000)[:-1000]

    with scripted(short, close_after=True) as server, pytest.raises(httpx.RemoteProtocolError):
        post(server.port, [b"a"])


def test_a_server_that_closes_without_answering_is_a_protocol_error(post: Post) -> None:
    with scripted(lambda head, body: None) as server, pytest.raises(httpx.RemoteProtocolError):
        post(server.port, [b"a"])


def test_a_silent_server_is_a_read_timeout(kind: str) -> None:
    release = threading.Event()

    def silent(head: bytes, body: bytes) -> bytes | None:
        release.wait(5)
        return None

    with (
        posting(kind, timeout=0.2) as post,
        scripted(silent) as server,
        pytest.raises(httpx.ReadTimeout),
    ):
        try:
            post(server.port, [b"a"])
        finally:
            release.set()


def test_nothing_listening_is_a_connect_error(post: Post) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        post(port, [b"a"])


def test_an_error_reply_in_chunks_is_read_whole(post: Post) -> None:
    problem = b'{"title":"bad step"}'

    def chunked(head: bytes, body: bytes) -> bytes:
        return (
            b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-type: application/problem+json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (problem[:7], problem[7:]))
            + b"0\r\n\r\n"
        )

    with scripted(chunked) as server:
        for _ in range(2):
            response = post(server.port, [b"a"])
            assert response.status_code == 422
            assert response.json() == {"title": "bad step"}
            assert _transfer.REPLY not in response.extensions
        assert server.connections == 1


def test_other_requests_go_to_the_inner_transport() -> None:
    seen: list[str] = []

    def inner(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text="inner")

    transport = _sockets.SocketTransport(httpx.MockTransport(inner))
    with httpx.Client(transport=transport) as http:
        assert http.get("http://127.0.0.1:9/plain").text == "inner"
        request = http.build_request("POST", "https://127.0.0.1:9/tls", content=b"a")
        request.extensions[_transfer.BULK] = _transfer.Bulk(None, OCTETS)
        assert http.send(request).text == "inner"

    async def through_async() -> None:
        transport = _sockets.AsyncSocketTransport(httpx.MockTransport(inner))
        async with httpx.AsyncClient(transport=transport) as http:
            assert (await http.get("http://127.0.0.1:9/plain")).text == "inner"
            request = http.build_request("POST", "https://127.0.0.1:9/tls", content=b"a")
            request.extensions[_transfer.BULK] = _transfer.Bulk(None, OCTETS)
            assert (await http.send(request)).text == "inner"

    asyncio.run(through_async())
    assert seen == ["http://127.0.0.1:9/plain", "https://127.0.0.1:9/tls"] * 2
