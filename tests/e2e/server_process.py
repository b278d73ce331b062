"""``python -m service serve`` in a subprocess on a data directory, stopped by PID.

The end-to-end tests that kill the server and start it again share this harness.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """The real server on 127.0.0.1 and a free port, open (no API keys), logging to ``log``."""

    def __init__(
        self,
        data_dir: Path,
        log: IO[bytes],
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log = log
        self.env = dict(env or {})
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: list[float] = []
        """How long each start took until /readyz answered 200."""

    @property
    def restarts(self) -> int:
        return max(len(self.start_seconds) - 1, 0)

    def start(self) -> None:
        env = {**os.environ, "OPTSERVE_ACCESS_LOG": "false", "OPTSERVE_LOG_LEVEL": "warning"}
        env.pop("OPTSERVE_API_KEYS", None)
        env.pop("OPTSERVE_STORAGE", None)
        env.update(self.env)
        command = [sys.executable, "-m", "service", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), *self.args]
        began = time.monotonic()
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self.log, stderr=self.log
        )
        wait_answering(self.process, self.url + "/readyz", 60, "the server")
        self.start_seconds.append(time.monotonic() - began)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            self.process = None


def wait_answering(process: subprocess.Popen[bytes], url: str, seconds: float, what: str) -> None:
    """Until ``url`` answers 200; fails if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what} exited at start"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} did not answer {url} in {seconds} s")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
