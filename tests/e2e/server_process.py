"""``python -m service serve`` in a subprocess on a data directory, stopped by PID.

The end-to-end tests that kill the server and start it again share this harness.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ChildProcess:
    """A subprocess logging to ``log``, started until a URL answers, stopped by its PID.

    ``start_seconds`` holds how long each start took until that URL answered 200.
    """

    def __init__(self, log: IO[bytes]) -> None:
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: list[float] = []

    @property
    def restarts(self) -> int:
        return max(len(self.start_seconds) - 1, 0)

    def _launch(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        ready_url: str,
        seconds: float,
        what: str,
        cwd: Path | None = None,
    ) -> None:
        began = time.monotonic()
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log, stderr=self.log)
        wait_answering(self.process, ready_url, seconds, what)
        self.start_seconds.append(time.monotonic() - began)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash; open connections drop."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            self.process = None


class ServerProcess(ChildProcess):
    """The real server on 127.0.0.1 and a free port, open (no API keys), logging to ``log``."""

    def __init__(
        self,
        data_dir: Path,
        log: IO[bytes],
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(log)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = dict(env or {})
        self.args = list(args)

    def start(self) -> None:
        env = {**os.environ, "OPTSERVE_ACCESS_LOG": "false", "OPTSERVE_LOG_LEVEL": "warning"}
        env.pop("OPTSERVE_API_KEYS", None)
        env.pop("OPTSERVE_STORAGE", None)
        env.update(self.env)
        command = [sys.executable, "-m", "service", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), *self.args]
        self._launch(command, env, self.url + "/readyz", 60, "the server", cwd=REPO)


class Logs:
    """Log files of the processes started, opened in ``workdir`` and closed at the end."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self._open: list[IO[bytes]] = []

    def open(self, name: str) -> IO[bytes]:
        log = open(self.workdir / name, "ab")  # noqa: SIM115 (closed in close())
        self._open.append(log)
        return log

    def close(self) -> None:
        for log in self._open:
            log.close()


@contextlib.contextmanager
def running_server(
    root: Path, env: Mapping[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[ServerProcess]:
    """A started server on ``root/data`` logging to ``root/server.log``, stopped on the way out."""
    with (root / "server.log").open("wb") as log:
        process = ServerProcess(root / "data", log, env, args)
        process.start()
        try:
            yield process
        finally:
            process.stop()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` from ``/proc/<pid>/status``, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) * 1024
    return values


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
