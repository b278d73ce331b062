"""A throwaway PostgreSQL cluster that the chaos tests may SIGKILL and start again.

It lives in a temporary directory, listens on a free port of 127.0.0.1 and on a socket
directory of its own (the machine's own cluster is never touched), and is stopped by its
postmaster's PID. ``initdb`` refuses to run as root, so as root the cluster is made and
run by the ``postgres`` system user, in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.e2e.server_process import free_port


def postgres_binaries() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else the newest Debian install."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    return Path(max(candidates, key=version)).parent if candidates else None


class PostgresCluster:
    """initdb, pg_ctl start, SIGKILL of the postmaster, start again (crash recovery)."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="optserve-chaos-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.sockets.mkdir()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.pid: int | None = None
        self.start_seconds: list[float] = []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def init(self) -> None:
        done = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")

    def start(self, timeout_s: float = 60) -> None:
        """Start the postmaster and wait until it accepts connections.

        After a SIGKILL the old backends may still be exiting and hold the shared memory
        block for a moment; PostgreSQL then refuses to start, so this tries again.
        """
        # fsync=off: the harness kills processes, never the machine, and what a killed
        # postmaster had written is in the kernel's page cache; fsync would only protect
        # against power loss, at seconds per commit on a shared CI disk.
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c max_connections=300 -c fsync=off"
        )
        began = time.monotonic()
        deadline = began + timeout_s
        while True:
            done = self._run(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "30",
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.log),
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}")
            time.sleep(0.2)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self.start_seconds.append(time.monotonic() - began)

    def kill(self) -> None:
        """SIGKILL the postmaster: no shutdown checkpoint, crash recovery at the next start."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        self._wait_gone(self.pid, 10)
        self.pid = None

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL if it does not go in time."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        if not self._wait_gone(self.pid, 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(self.pid, 10)
        self.pid = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _wait_gone(pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.02)
        return False
