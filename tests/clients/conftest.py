"""Client tests: the client importable from a plain checkout, and live servers.

The client is its own distribution (``clients/python``); the tests import it from this
checkout's source tree, installed or not.

``live_url`` starts a real server (``python -m service serve``, in-memory storage) on a
free loopback port for the test session and stops it by PID, and ``client`` is a client of
it; ``live_server_with_keys`` starts one that requires API keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server_process import free_port, terminate

REPO = Path(__file__).resolve().parents[2]
CLIENT_SRC = REPO / "clients" / "python"

# The client of this checkout, whether or not (and wherever) a client is installed: the
# tests check the client next to the server they start.
sys.path.insert(0, str(CLIENT_SRC))

from optserve_client import Client  # noqa: E402

API_KEYS = "alice:key-alice,bob:key-bob"


def start_server(log: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "OPTSERVE_STORAGE": "memory", "OPTSERVE_LOG_LEVEL": "warning"}
    environment.pop("OPTSERVE_API_KEYS", None)
    environment.update(env)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    terminate(process)
    raise RuntimeError(f"server did not become healthy in 60 s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_server(tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield url
    finally:
        terminate(process)


@pytest.fixture
def client(live_url: str) -> Iterator[Client]:
    """A client of the live server (modules that test against a fake one define their own)."""
    with Client(live_url) as c:
        yield c


@pytest.fixture(scope="session")
def live_url_with_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server-keys") / "server.log"
    process, url = start_server(log, OPTSERVE_API_KEYS=API_KEYS)
    try:
        yield url
    finally:
        terminate(process)
