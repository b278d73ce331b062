"""Hostile clients against the real server: oversized chunked uploads, a budget of body
bytes in flight, senders that stall, idle connections, and bad numbers on a kept-alive
connection. Memory is read from ``/proc/<pid>/status``."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.e2e.server_process import ServerProcess, memory

MiB = 1 << 20
BUDGET = 64 * MiB
UPLOAD = 600 * MiB
SMALL = {"optimizer": {"name": "SGD", "lr": 0.1}, "params": {"w": {"shape": [1000]}}}
BODY_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.5
MAX_IDLE = 5

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads memory from /proc"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("hostile")
    with (directory / "server.log").open("wb") as log:
        process = _start(directory, log)
        try:
            yield process
        finally:
            process.stop()


def _start(directory: Path, log: IO[bytes]) -> ServerProcess:
    env = {
        "OPTSERVE_MAX_BODY_BYTES": str(BUDGET),
        "OPTSERVE_MAX_BODY_BYTES_IN_FLIGHT": str(BUDGET),
        "OPTSERVE_BODY_BUDGET_WAIT_S": "0.5",
        "OPTSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "OPTSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "OPTSERVE_MAX_IDLE_CONNECTIONS": str(MAX_IDLE),
    }
    process = ServerProcess(directory / "data", log, env)
    process.start()
    return process


def _pid(server: ServerProcess) -> int:
    assert server.process is not None
    return server.process.pid


def _read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def _chunked_upload(port: int, path: str, total: int, chunk: int = MiB) -> tuple[bytes, int]:
    """POST ``total`` bytes as a chunked body, stopping as soon as the server answers.

    Returns the server's answer and how many body bytes were sent.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = f"{chunk:x}\r\n".encode() + b"7" * chunk + b"\r\n"
    sent = 0
    try:
        sock.sendall(head.encode())
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(piece)
            sent += chunk
    except OSError:
        pass  # the server closed after answering; the answer is still there to read
    response = _read_response(sock)
    sock.close()
    return response, sent


def _concurrently(path: str, port: int, count: int = 4) -> list[tuple[bytes, int]]:
    results: list[tuple[bytes, int]] = [(b"", 0)] * count

    def upload(i: int) -> None:
        results[i] = _chunked_upload(port, path, UPLOAD)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_chunked_uploads_to_a_small_session_are_refused_early(server: ServerProcess) -> None:
    sid = httpx.post(f"{server.url}/v1/sessions", json=SMALL).json()["id"]
    before = memory(_pid(server))["VmRSS"]
    began = time.monotonic()
    results = _concurrently(f"/v1/sessions/{sid}/step", server.port)
    elapsed = time.monotonic() - began
    for response, sent in results:
        assert _status(response) == 413, response[:300]
        problem = json.loads(response.partition(b"\r\n\r\n")[2])
        # Refused at the session's bound (a few hundred KB, the size of 1000 numbers and
        # a header), long before the 600 MB; what was sent is that plus socket buffers.
        assert problem["limit"] == "step_body_bytes" and problem["maximum"] < MiB
        assert sent < 64 * MiB
    growth = memory(_pid(server))["VmHWM"] - before
    assert growth < BUDGET, f"peak RSS grew by {growth / MiB:.1f} MiB"
    assert elapsed < 15
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 0


def test_bodies_in_flight_stay_within_the_budget(server: ServerProcess) -> None:
    # Session creation has no per-session bound: each upload may take up to
    # max_body_bytes, and together they may not pass the in-flight budget.
    before = memory(_pid(server))["VmRSS"]
    results = _concurrently("/v1/sessions", server.port)
    statuses = sorted(_status(response) for response, _ in results)
    assert set(statuses) <= {413, 503}, statuses
    assert 503 in statuses, "four uploads of the whole budget each cannot all fit at once"
    for response, _ in results:
        if _status(response) == 503:
            assert b"retry-after: 1" in response.lower()
            assert b"/problems/busy" in response
    # The budget counts body bytes; the peak adds the transport's buffers and the
    # allocator's slack around them.
    growth = memory(_pid(server))["VmHWM"] - before
    assert growth < 1.5 * BUDGET, f"peak RSS grew by {growth / MiB:.1f} MiB"
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_sender_that_stalls_mid_body_is_cut_off(server: ServerProcess) -> None:
    sid = httpx.post(f"{server.url}/v1/sessions", json=SMALL).json()["id"]
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = b'{"grads": [' + b"0.5, " * 100
    sock.sendall(
        f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode()
        + body
    )
    began = time.monotonic()
    response = _read_response(sock, timeout=BODY_TIMEOUT_S + 10)
    waited = time.monotonic() - began
    sock.close()
    assert _status(response) == 408, response[:300]
    assert b"/problems/body-timeout" in response
    assert BODY_TIMEOUT_S * 0.9 <= waited < BODY_TIMEOUT_S + 5
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 0


def test_headers_that_never_finish_are_cut_off(server: ServerProcess) -> None:
    partial = socket.create_connection(("127.0.0.1", server.port))
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    silent = socket.create_connection(("127.0.0.1", server.port))
    began = time.monotonic()
    response = _read_response(partial, timeout=HEADER_TIMEOUT_S + 10)
    assert _status(response) == 408 and b"/problems/header-timeout" in response
    assert _read_response(silent, timeout=HEADER_TIMEOUT_S + 10) == b""
    assert time.monotonic() - began < HEADER_TIMEOUT_S + 5
    partial.close()
    silent.close()


def _exchange(sock: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    """Send one request on a kept-alive ``sock``; its answer's head and body."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if b"content-length" in line)
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def _answered(sock: socket.socket) -> bytes:
    return _exchange(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0]


def test_idle_keep_alive_connections_past_the_cap_are_closed(server: ServerProcess) -> None:
    opened = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4 * MAX_IDLE)]
    for sock in opened:
        assert _status(_answered(sock)) == 200
    time.sleep(0.3)  # well inside the keep-alive timeout: only the cap closes them
    closed = []
    for sock in opened:
        readable, _, _ = select.select([sock], [], [], 0)
        closed.append(bool(readable) and sock.recv(1) == b"")
    # The longest idle went first; the newest stay usable.
    assert closed == [True] * (3 * MAX_IDLE) + [False] * MAX_IDLE
    assert _status(_answered(opened[-1])) == 200
    for sock in opened:
        sock.close()


def test_a_refused_number_leaves_the_connection_usable(server: ServerProcess) -> None:
    huge = "1" + "0" * 400
    shapes = {"optimizer.lr": "[1]", "params.w.shape": "[" + ", ".join(["1"] * 65) + "]"}
    optimizers = {"optimizer.lr": f'{{"name": "SGD", "lr": {huge}}}'}
    sock = socket.create_connection(("127.0.0.1", server.port))
    for field, shape in shapes.items():
        optimizer = optimizers.get(field, '{"name": "SGD", "lr": 0.1}')
        body = f'{{"optimizer": {optimizer}, "params": {{"w": {{"shape": {shape}}}}}}}'.encode()
        request = (
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        head, answer = _exchange(sock, request)
        assert _status(head) == 422, answer
        assert json.loads(answer)["errors"][0]["field"] == field
        # The same connection answers the next request: a 422 does not drop it.
        assert _status(_answered(sock)) == 200
    sock.close()
