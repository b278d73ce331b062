"""The real server: ``python -m service serve`` in a subprocess on a free loopback port.

Covers what TestClient cannot: uvicorn's own framing (a chunked body with no length,
counted while it streams), the CLI's refusal to expose an open server, and shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 8192


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    data = tmp_path_factory.mktemp("data")
    env = {
        **os.environ,
        "OPTSERVE_MAX_BODY_BYTES": str(LIMIT),
        "OPTSERVE_API_KEYS": "alice:key-a",
        "OPTSERVE_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--data-dir", str(data)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {process.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.1)
        yield url
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_real_server_serves_sessions_with_auth(server: str) -> None:
    headers = {"Authorization": "Bearer key-a"}
    config = {"optimizer": {"name": "SGD", "lr": 0.5}, "params": {"x": {"shape": [2]}}}
    created = httpx.post(f"{server}/v1/sessions", json=config, headers=headers)
    assert created.status_code == 201
    step = httpx.post(
        f"{server}{created.headers['location']}/step",
        json={"grads": [1.0, -2.0]},
        headers={**headers, "X-Request-ID": "req-1"},
    )
    assert step.json()["deltas"] == {"x": [-0.5, 1.0]}
    assert step.headers["x-request-id"] == "req-1"
    assert httpx.get(f"{server}/v1/sessions").status_code == 401


def test_chunked_body_over_the_limit_is_413(server: str) -> None:
    chunk = b"x" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    answer = _raw(
        server,
        b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer key-a\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"application/problem+json" in answer


def test_declared_length_over_the_limit_is_413_before_the_body(server: str) -> None:
    answer = _raw(
        server,
        b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer key-a\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n{" % (LIMIT + 1),
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_open_server_on_a_public_address_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--storage", "memory"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--insecure" in result.stderr
