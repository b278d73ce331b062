"""A real PostgreSQL for the tests: the one ``OPTSERVE_TEST_DATABASE_URL`` names, or a
throwaway cluster started from the machine's ``initdb``/``pg_ctl``.

The throwaway cluster lives in a temporary directory, listens on a free port of 127.0.0.1
and on a socket directory of its own, and is stopped by its postmaster's PID: the
machine's own cluster (port 5432) is never touched. ``initdb`` refuses to run as root, so
as root the cluster is made and run by the ``postgres`` system user, in a directory that
user owns.

Each test gets a schema of its own (the URL carries ``search_path``), so tests never see
each other's rows and an external database needs no CREATE DATABASE right.

Registered as a pytest plugin by ``tests/conftest.py``; the fixtures are

- ``postgres_url``: a fresh, empty schema on the shared cluster (or the external one);
- ``own_postgres``: a cluster of the test's own, which it may stop and start again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

URL_VARIABLE = "OPTSERVE_TEST_DATABASE_URL"


def bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else the newest Debian install."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    return Path(max(candidates, key=version)).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_schema(url: str, schema: str) -> str:
    """``url`` with every connection's ``search_path`` set to ``schema``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


class Cluster:
    """A PostgreSQL cluster in a temporary directory, run by an unprivileged user."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="optserve-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            self.sockets.mkdir()
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            os.chown(self.sockets, entry.pw_uid, entry.pw_gid)
        else:
            self.sockets.mkdir()
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        log = self.root / "server.log"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-o", options,
                  "-l", str(log))  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Fast shutdown of this cluster's postmaster, by its PID; waits until it is gone."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    binaries = bin_dir()
    if binaries is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, initdb needs a 'postgres' system user to run as")
    cluster = Cluster(binaries)
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        cluster.remove()
        raise
    return cluster


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a database the tests may create schemas in."""
    external = os.environ.get(URL_VARIABLE)
    if external:
        yield external
        return
    cluster = start_cluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()


def _schema_url(server: str) -> Iterator[str]:
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A database URL whose connections see a fresh, empty schema of this test's own."""
    yield from _schema_url(postgres_server)


@pytest.fixture
def own_postgres() -> Iterator[Cluster]:
    """A throwaway cluster for this test alone (it may stop and restart it)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.remove()
