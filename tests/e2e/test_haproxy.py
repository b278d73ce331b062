"""deploy/haproxy.cfg in a real HAProxy: valid, hashing on the session id, routing around
a dead replica, and retrying only what the server deduplicates.

The replicas here are real servers on the memory store (each its own; no session is
shared), enough to see where HAProxy sends a request: it says so in ``X-Served-By``.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.proxy_process import TEMPLATE, ProxyProcess, check_config, haproxy_binary
from tests.e2e.server_process import ServerProcess

HAPROXY = haproxy_binary()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def haproxy() -> str:
    assert HAPROXY is not None
    return HAPROXY


def test_the_deployed_config_is_valid() -> None:
    env = {f"OPTSERVE_REPLICA{n}": f"127.0.0.1:{9000 + n}" for n in (1, 2, 3)}
    output = check_config(haproxy(), TEMPLATE, env)
    assert "Configuration file is valid" in output
    assert "WARNING" not in output, output


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[list[ServerProcess], ProxyProcess]]:
    with open(tmp_path / "servers.log", "wb") as log:
        replicas = [
            ServerProcess(tmp_path / f"r{n}", log, args=["--storage", "memory"]) for n in (1, 2, 3)
        ]
        proxy: ProxyProcess | None = None
        try:
            for replica in replicas:
                replica.start()
            addresses = [f"127.0.0.1:{r.port}" for r in replicas]
            proxy = ProxyProcess(haproxy(), addresses, tmp_path, log)
            proxy.start()
            proxy.wait_servers_up()
            yield replicas, proxy
        finally:
            if proxy is not None:
                proxy.stop()
            for replica in replicas:
                replica.stop()


def served_by(client: httpx.Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 404, response.text  # no such session on any replica
    return response.headers["x-served-by"]


def test_every_request_of_a_session_goes_to_the_same_replica(
    three: tuple[list[ServerProcess], ProxyProcess],
) -> None:
    _, proxy = three
    ids = [uuid.uuid4().hex for _ in range(60)]
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        first = {sid: served_by(client, f"/v1/sessions/{sid}") for sid in ids}
        for sid in ids:
            assert served_by(client, f"/v1/sessions/{sid}/params") == first[sid]
            step = client.post(f"/v1/sessions/{sid}/step", json={"grads": [0.0]})
            assert step.headers["x-served-by"] == first[sid]
    # The hash spreads sessions over the replicas (60 ids on 3: all three, with odds
    # of missing one below 1e-9 for a fair hash).
    assert set(first.values()) == {"replica1", "replica2", "replica3"}


def test_a_dead_replicas_sessions_move_and_only_theirs(
    three: tuple[list[ServerProcess], ProxyProcess],
) -> None:
    replicas, proxy = three
    ids = [uuid.uuid4().hex for _ in range(60)]
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        before = {sid: served_by(client, f"/v1/sessions/{sid}") for sid in ids}
        replicas[0].kill()
        # Before the health checks notice, a refused connection is retried on another
        # replica (retries + redispatch): the client never sees the dead one.
        right_after = {sid: served_by(client, f"/v1/sessions/{sid}") for sid in ids}
        assert "replica1" not in right_after.values()
        deadline = time.monotonic() + 30
        while proxy.servers()["replica1"].startswith("UP"):
            assert time.monotonic() < deadline, "the dead replica was never marked down"
            time.sleep(0.05)
        after = {sid: served_by(client, f"/v1/sessions/{sid}") for sid in ids}
    assert "replica1" not in after.values()
    # Consistent hashing: the sessions of the live replicas stay where they were warm.
    assert {s: r for s, r in before.items() if r != "replica1"} == {
        s: r for s, r in after.items() if before[s] != "replica1"
    }


UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
    b"retry-after: 1\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
)


class FailingReplica:
    """A backend that answers health checks and fails every other request: it drops it
    unanswered (``answer`` None), as a replica killed between reading a request and
    answering it does, or sends ``answer``."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                if line.startswith("GET /readyz"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                elif line:
                    self.requests.append(line)
                    if self.answer is not None:
                        conn.sendall(self.answer)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(params=["empty-response", "503"])
def failing(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[FailingReplica, ProxyProcess]]:
    backend = FailingReplica(None if request.param == "empty-response" else UNAVAILABLE)
    with open(tmp_path / "haproxy.log", "wb") as log:
        proxy = ProxyProcess(haproxy(), [f"127.0.0.1:{backend.port}"], tmp_path, log)
        try:
            proxy.start()
            proxy.wait_servers_up()
            yield backend, proxy
        finally:
            proxy.stop()
            backend.close()


@pytest.mark.parametrize(
    ("method", "path", "headers", "retried"),
    [
        ("POST", "/v1/sessions/s1/step", {"Idempotency-Key": "k1"}, True),
        ("GET", "/v1/sessions/s1", {}, True),
        ("POST", "/v1/sessions/s1/step", {}, False),
        ("POST", "/v1/sessions", {"Idempotency-Key": "k1"}, False),
        ("POST", "/v1/sessions/s1/schedule/step", {"Idempotency-Key": "k1"}, False),
        ("DELETE", "/v1/sessions/s1", {}, False),
        ("PATCH", "/v1/sessions/s1/param_groups/0", {}, False),
    ],
)
def test_only_requests_the_server_deduplicates_are_resent(
    failing: tuple[FailingReplica, ProxyProcess],
    method: str,
    path: str,
    headers: dict[str, str],
    retried: bool,
) -> None:
    backend, proxy = failing
    response = httpx.request(method, proxy.url + path, headers=headers, json={}, timeout=30)
    # HAProxy answers 502 for an empty response; a 503 is passed on once retries are spent.
    assert response.status_code == (502 if backend.answer is None else 503)
    sent = [line for line in backend.requests if line.split(" ")[1] == path]
    assert len(sent) == (3 if retried else 1), sent  # retries 2: three tries in all
