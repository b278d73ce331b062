"""Bodies received in place: the server's protocol reads a step's body from the socket
straight into the step's buffer (``service/api/in_place.py``).

The app runs under uvicorn with the server's own protocol, in a thread of this process,
so that the tests can see which bodies arrived in place and what the body budget holds.
Every exchange is a raw socket: the tests choose where a body pauses, stops or is
followed by the next request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import uvicorn

from service.api import server as server_module
from service.api.app import create_app
from service.api.in_place import InPlace
from service.codec import safetensors
from service.config import Settings
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state
from tests.api.conftest import SAFETENSORS

SIZE = 300_000
"""Elements of the tensor: a 1.2 MB body, far past the 256 KiB a socket read takes."""
FIRST_BYTES = 1000
"""What a test sends of a step request before the rest: its head and the body's first bytes,
which arrive as messages before the route offers its buffer."""


@dataclass
class Served:
    port: int
    app: object
    placed: list[InPlace]
    """Every body the protocol received in place, in order."""


@contextmanager
def _serving(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Iterator[Served]:
    placed: list[InPlace] = []

    class Recorded(InPlace):
        def __init__(self, view: memoryview, start: int, filled: int) -> None:
            super().__init__(view, start, filled)
            placed.append(self)

    monkeypatch.setattr(server_module, "InPlace", Recorded)
    app = create_app(Settings(storage="memory", log_level="warning", **settings))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=server_module.http_protocol(),
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Served(port, app, placed)
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    with _serving(monkeypatch, body_timeout_s=0.5) as served:
        yield served


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_reply(sock: socket.socket, buffered: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed before a reply's head: {bytes(buffered)!r}")
        buffered += chunk
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed mid-reply")
        body += chunk
    buffered[:] = body[length:]
    return status, headers, bytes(body[:length])


def _request(method: str, path: str, body: bytes = b"", content_type: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\nAccept: {content_type}\r\n"
    return head.encode() + b"\r\n" + body


def _create(sock: socket.socket, buffered: bytearray) -> str:
    config = {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [SIZE]}}}
    sock.sendall(_request("POST", "/v1/sessions", json.dumps(config).encode(), "application/json"))
    status, _, body = _read_reply(sock, buffered)
    assert status == 201, body
    session_id: str = json.loads(body)["id"]
    return session_id


def _begin_step(sock: socket.socket, buffered: bytearray, grad: np.ndarray) -> tuple[str, bytes]:
    """A new session, and its step's request of which :data:`FIRST_BYTES` are sent: the
    session, the whole request."""
    session = _create(sock, buffered)
    step = _request("POST", f"/v1/sessions/{session}/step", _step_body(grad), SAFETENSORS)
    sock.sendall(step[:FIRST_BYTES])
    time.sleep(0.05)
    return session, step


def _step_body(grad: np.ndarray) -> bytes:
    return b"".join(bytes(part) for part in safetensors.encode_parts({"w": grad}))


def _core_deltas(grads: list[np.ndarray]) -> list[np.ndarray]:
    """Core's deltas for these steps in process (core's numbers are torch's: tests/core)."""
    plan = plan_from_config(
        {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [SIZE]}}}
    )
    state = initial_state(plan)
    deltas = []
    for grad in grads:
        out = [np.empty(SIZE, np.float32)]
        apply_step(plan, state, [grad.copy()], None, out)
        deltas.append(out[0])
    return deltas


def _grads(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(SIZE, dtype=np.float32) for _ in range(n)]


def _deltas(body: bytes) -> np.ndarray:
    tensors, _ = safetensors.decode(body)
    return np.asarray(tensors["w"])


def test_a_body_sent_in_pieces_arrives_in_place_with_core_deltas(served: Served) -> None:
    grads = _grads(2)
    with _connect(served.port) as sock:
        buffered = bytearray()
        session = _create(sock, buffered)
        expected = _core_deltas(grads)
        for n, grad in enumerate(grads):
            request = _request(
                "POST", f"/v1/sessions/{session}/step", _step_body(grad), SAFETENSORS
            )
            # The head and the first bytes arrive as messages; the rest once the app has
            # handed its buffer over.
            for start in range(0, len(request), 200_000):
                sock.sendall(request[start : start + 200_000])
                time.sleep(0.01)
            status, _, reply = _read_reply(sock, buffered)
            assert status == 200, reply
            np.testing.assert_array_equal(_deltas(reply), expected[n])
    assert len(served.placed) == 2
    for body in served.placed:
        assert body.filled == body.end
        assert 0 < body.start < body.end  # part came as messages, the rest in place


def test_the_request_after_a_body_in_place_is_read_by_a_fresh_parser(served: Served) -> None:
    grads = _grads(2)
    with _connect(served.port) as sock:
        buffered = bytearray()
        session, step = _begin_step(sock, buffered, grads[0])
        # The step's body ends where the next request begins, in one send.
        sock.sendall(step[FIRST_BYTES:] + _request("GET", f"/v1/sessions/{session}"))
        status, _, reply = _read_reply(sock, buffered)
        assert status == 200
        np.testing.assert_array_equal(_deltas(reply), _core_deltas(grads[:1])[0])
        status, _, document = _read_reply(sock, buffered)
        assert status == 200
        assert json.loads(document)["step"] == 1
    assert len(served.placed) == 1


def test_a_stall_in_place_is_408_and_the_server_goes_on(served: Served) -> None:
    grads = _grads(1)
    with _connect(served.port) as sock:
        buffered = bytearray()
        session, step = _begin_step(sock, buffered, grads[0])
        sock.sendall(step[FIRST_BYTES:600_000])  # in place by now; then nothing for the timeout
        status, headers, problem = _read_reply(sock, buffered)
        assert status == 408, problem
        assert headers.get("connection") == "close"
        # Bytes sent after the answer are drained, never written into the step's buffer.
        sock.sendall(step[600_000:])
    assert len(served.placed) == 1
    assert served.placed[0].view is None
    budget = served.app.state.body_budget  # type: ignore[attr-defined]
    assert budget.used == 0
    with _connect(served.port) as sock:
        buffered = bytearray()
        sock.sendall(
            _request("POST", f"/v1/sessions/{session}/step", _step_body(grads[0]), SAFETENSORS)
        )
        status, _, reply = _read_reply(sock, buffered)
        assert status == 200
        np.testing.assert_array_equal(_deltas(reply), _core_deltas(grads)[0])  # step 1


def test_a_client_gone_mid_body_leaves_the_session_as_it_was(served: Served) -> None:
    grads = _grads(1)
    with _connect(served.port) as sock:
        buffered = bytearray()
        session, step = _begin_step(sock, buffered, grads[0])
        sock.sendall(step[FIRST_BYTES:700_000])
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while served.placed and served.placed[0].view is not None:
        assert time.monotonic() < deadline, "the lost connection's buffer is still written"
        time.sleep(0.02)
    assert len(served.placed) == 1
    budget = served.app.state.body_budget  # type: ignore[attr-defined]
    assert budget.used == 0
    with _connect(served.port) as sock:
        buffered = bytearray()
        sock.sendall(_request("GET", f"/v1/sessions/{session}"))
        status, _, document = _read_reply(sock, buffered)
        assert status == 200
        assert json.loads(document)["step"] == 0


def test_a_body_that_arrives_with_its_head_is_not_received_in_place(served: Served) -> None:
    config = {"optimizer": {"name": "SGD", "lr": 0.1}, "params": {"w": {"shape": [1000]}}}
    with _connect(served.port) as sock:
        buffered = bytearray()
        sock.sendall(
            _request("POST", "/v1/sessions", json.dumps(config).encode(), "application/json")
        )
        status, _, created = _read_reply(sock, buffered)
        assert status == 201
        session = json.loads(created)["id"]
        step = _step_body(np.ones(1000, np.float32))
        sock.sendall(_request("POST", f"/v1/sessions/{session}/step", step, SAFETENSORS))
        status, _, reply = _read_reply(sock, buffered)
        assert status == 200
        np.testing.assert_array_equal(_deltas(reply), np.full(1000, -0.1, np.float32))
    assert served.placed == []


def test_a_body_in_place_holds_its_whole_length_in_the_budget_before_it_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Room for one 1.2 MB body at a time: the second waits for room, then gets 503.
    limits = {"max_body_bytes": 1_500_000, "max_body_bytes_in_flight": 1_500_000}
    with _serving(monkeypatch, body_budget_wait_s=0.3, **limits) as served:
        grads = _grads(1)
        with _connect(served.port) as first, _connect(served.port) as second:
            buffered = [bytearray(), bytearray()]
            session = _create(first, buffered[0])
            step = _request(
                "POST", f"/v1/sessions/{session}/step", _step_body(grads[0]), SAFETENSORS
            )
            first.sendall(step[:FIRST_BYTES])
            time.sleep(0.1)  # the first body is in place, its length held
            second.sendall(step[:FIRST_BYTES])
            status, _, problem = _read_reply(second, buffered[1])
            assert status == 503, problem
            assert json.loads(problem)["type"] == "/problems/busy"
            first.sendall(step[FIRST_BYTES:])
            status, _, reply = _read_reply(first, buffered[0])
            assert status == 200
            np.testing.assert_array_equal(_deltas(reply), _core_deltas(grads)[0])
        assert len(served.placed) == 1
        deadline = time.monotonic() + 5
        while served.app.state.body_budget.used:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the budget was not given back"
            time.sleep(0.02)
