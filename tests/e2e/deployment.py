"""The deployment under test: PostgreSQL (for the shared store), N replicas, HAProxy in
front; started in that order, every process stopped by its PID on the way out.

``Fleet`` is the part that does not depend on the chaos plan (replicas, HAProxy, stopping);
``bench/replicas.py`` runs its own PostgreSQL under one too."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Generic, Protocol, Self, TypeVar

from tests.e2e.chaos_plan import HarnessError, Plan
from tests.e2e.postgres_process import PostgresCluster, postgres_binaries
from tests.e2e.proxy_process import ProxyProcess, haproxy_binary
from tests.e2e.server_process import Logs, ServerProcess


class _Database(Protocol):
    @property
    def url(self) -> str: ...

    def remove(self) -> None: ...


DatabaseT = TypeVar("DatabaseT", bound=_Database)


class Fleet(Generic[DatabaseT]):
    """Replicas of the server, HAProxy in front, and the database under them if any.

    Use as a context manager: everything started is stopped by its PID on the way out,
    failure or not. Subclasses say in ``start`` what they need and call ``_start_fleet``.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = Logs(workdir)
        self.database: DatabaseT | None = None
        self.replicas: list[ServerProcess] = []
        self.proxy: ProxyProcess | None = None

    def start(self) -> None:
        raise NotImplementedError

    def _start_fleet(
        self, count: int, env: Mapping[str, str], storage: str, proxy_binary: str
    ) -> None:
        """``count`` replicas on ``storage``, then HAProxy; returns once it routes to all."""
        for n in range(1, count + 1):
            replica = ServerProcess(
                self.workdir / f"replica{n}-data",
                self.logs.open(f"replica{n}.log"),
                env,
                args=["--storage", storage],
            )
            # Listed before it starts, so that stop() stops one that fails half-way.
            self.replicas.append(replica)
            replica.start()
        addresses = [f"127.0.0.1:{replica.port}" for replica in self.replicas]
        self.proxy = ProxyProcess(
            proxy_binary, addresses, self.workdir, self.logs.open("haproxy.log")
        )
        self.proxy.start()
        self.proxy.wait_servers_up()

    def stop(self) -> None:
        """Stop every process this fleet started, each by its PID."""
        with contextlib.ExitStack() as stack:
            if self.database is not None:
                stack.callback(self.database.remove)
            for replica in self.replicas:
                stack.callback(replica.stop)
            if self.proxy is not None:
                stack.callback(self.proxy.stop)
        self.logs.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.proxy is not None
        return self.proxy.url


class Deployment(Fleet[PostgresCluster]):
    """The chaos plan's deployment: its store, replicas and lease, PostgreSQL if it asks."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        super().__init__(workdir)
        self.plan = plan

    def start(self) -> None:
        plan = self.plan
        env = {"OPTSERVE_SNAPSHOT_EVERY": "25", "OPTSERVE_LEASE_SECONDS": str(plan.lease_seconds)}
        if plan.storage == "postgres":
            binaries = postgres_binaries()
            if binaries is None:
                raise HarnessError("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
            self.database = PostgresCluster(binaries)
            self.database.init()
            self.database.start()
            env["OPTSERVE_DATABASE_URL"] = self.database.url
        binary = haproxy_binary()
        if binary is None:
            raise HarnessError("no haproxy binary")
        self._start_fleet(plan.replicas, env, plan.storage, binary)

    def restart_replica(self, n: int, down_s: float) -> None:
        """SIGKILL replica ``n``, start it again, return once HAProxy routes to it."""
        assert self.proxy is not None
        replica = self.replicas[n]
        replica.kill()
        time.sleep(down_s)
        replica.start()
        self.proxy.wait_servers_up(30, f"replica{n + 1}")

    def restart_proxy(self, down_s: float) -> None:
        assert self.proxy is not None
        self.proxy.kill()
        time.sleep(down_s)
        self.proxy.start()
        self.proxy.wait_servers_up(30)

    def restart_database(self, down_s: float) -> None:
        assert self.database is not None
        self.database.kill()
        time.sleep(down_s)
        self.database.start()
