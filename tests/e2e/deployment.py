"""The deployment under test: PostgreSQL (for the shared store), N replicas, HAProxy in
front; started in that order, every process stopped by its PID on the way out."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import IO

from tests.e2e.chaos_plan import HarnessError, Plan
from tests.e2e.postgres_process import PostgresCluster, postgres_binaries
from tests.e2e.proxy_process import ProxyProcess, haproxy_binary
from tests.e2e.server_process import ServerProcess


class Deployment:
    """PostgreSQL (for the postgres store), the replicas and HAProxy, started in order.

    Use as a context manager: everything started is stopped on the way out, failure or not.
    """

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.database: PostgresCluster | None = None
        self.replicas: list[ServerProcess] = []
        self.proxy: ProxyProcess | None = None
        self._logs: list[IO[bytes]] = []

    def _log(self, name: str) -> IO[bytes]:
        log = open(self.workdir / name, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        return log

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
        for n in range(1, plan.replicas + 1):
            replica = ServerProcess(
                self.workdir / f"replica{n}-data",
                self._log(f"replica{n}.log"),
                env,
                args=["--storage", plan.storage],
            )
            self.replicas.append(replica)
            replica.start()
        binary = haproxy_binary()
        if binary is None:
            raise HarnessError("no haproxy binary")
        addresses = [f"127.0.0.1:{replica.port}" for replica in self.replicas]
        self.proxy = ProxyProcess(binary, addresses, self.workdir, self._log("haproxy.log"))
        self.proxy.start()
        self.proxy.wait_servers_up()

    def stop(self) -> None:
        """Stop every process this deployment started, each by its PID."""
        with contextlib.ExitStack() as stack:
            if self.database is not None:
                stack.callback(self.database.remove)
            for replica in self.replicas:
                stack.callback(replica.stop)
            if self.proxy is not None:
                stack.callback(self.proxy.stop)
        for log in self._logs:
            log.close()

    def __enter__(self) -> Deployment:
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
