"""Many replicas on PostgreSQL, measured: three Markdown tables from one run.

    python bench/replicas.py [--sizes 1e3,1e5,1e6] [--budget-sessions 1000]
                             [--budget-mib 64] [--budget-params 100000] [--cold-steps 50]
                             [--leases 3,10] [--repetitions 3] [--tables 1,2,3]

1. **Step latency** through the official Python client (``optserve_client.Client``,
   safetensors wire) of a float32 Adam session holding no params: an embedded disk
   server, one replica on PostgreSQL addressed directly, and the same deployment through
   HAProxy (three replicas behind it), stepped in turn so that a busy machine slows them
   alike; next to the floor for the same bytes (a raw loopback TCP round trip of the
   step's request and reply, ``bench/tcp_echo.py``). p50 and p90 in ms.
2. **Sessions under a memory budget**: one disk server with ``OPTSERVE_MEMORY_BUDGET``,
   many more sessions stored than fit (each created holding its params and stepped
   once), then steps of a session in memory and of sessions that must be loaded first,
   in turn; sessions held in memory at the end (created + loaded - evicted, counted from
   the server's debug log), the server's RSS from ``/proc/<pid>/status``.
3. **Takeover** of a 1M-param session: three replicas on PostgreSQL behind HAProxy, a
   client stepping the session through the proxy (the client retries every step with its
   Idempotency-Key, at most 0.25 s apart), the replica holding it SIGKILLed: time from
   the kill to the next acknowledged step, per ``OPTSERVE_LEASE_SECONDS``; then the
   killed replica is started again (process start to ``/readyz`` 200, to HAProxy's UP),
   and the longest step while the session moves back to it. Last, one more replica
   restart under ``-X importtime`` says where a start's time goes.

The processes are the end-to-end harness's (``tests/e2e``: ``ServerProcess``,
``ProxyProcess`` with ``deploy/haproxy.cfg``, both started by its ``Fleet``) on a
throwaway PostgreSQL cluster (``tests/postgres_cluster.py``: ``fsync`` and
``synchronous_commit`` on, as in production; ``tests/e2e/deployment.py`` runs its own
with ``fsync`` off, fine for crash tests but not for timing commits), all on loopback,
each stopped by its PID. Needs
``haproxy`` and the PostgreSQL server binaries (``initdb``, ``pg_ctl``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The harness lives with the tests and the client in clients/python: use this checkout's.
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]

from optserve_client import Client, RetryPolicy, Session  # noqa: E402
from optserve_client import safetensors as wire  # noqa: E402

from bench.tcp_echo import EchoClient, EchoServer  # noqa: E402
from tests.e2e.deployment import Fleet  # noqa: E402
from tests.e2e.proxy_process import haproxy_binary  # noqa: E402
from tests.e2e.server_process import Logs, ServerProcess, free_port, memory  # noqa: E402
from tests.postgres_cluster import Cluster, bin_dir  # noqa: E402

SAFETENSORS = "application/vnd.optserve.safetensors"
ADAM = {"name": "Adam", "lr": 1e-3}


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ms(samples: Sequence[float], q: float) -> float:
    return 1000 * float(np.quantile(samples, q))


def seconds(samples: Sequence[float]) -> str:
    return ", ".join(f"{s:.1f}" for s in samples)


# -- the processes ---------------------------------------------------------------------


class Replicas(Fleet[Cluster]):
    """PostgreSQL, ``count`` replicas on it and HAProxy in front (a context manager)."""

    def __init__(self, workdir: Path, count: int, lease_seconds: float) -> None:
        super().__init__(workdir)
        self.count = count
        self.lease_seconds = lease_seconds

    def start(self) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
        proxy_binary = haproxy_binary()
        if proxy_binary is None:
            raise SystemExit("no haproxy binary on this machine")
        self.database = Cluster(binaries)
        self.database.init()
        self.database.start()
        env = {
            "OPTSERVE_DATABASE_URL": self.database.url,
            "OPTSERVE_LEASE_SECONDS": str(self.lease_seconds),
            "OPTSERVE_LOG_LEVEL": "info",  # the startup lines time a start's phases
        }
        self._start_fleet(self.count, env, "postgres", proxy_binary)

    def log_path(self, index: int) -> Path:
        return self.workdir / f"replica{index + 1}.log"

    def served_by(self, session_id: str) -> int:
        """Index of the replica HAProxy sends the session to (its ``X-Served-By``)."""
        response = httpx.get(f"{self.url}/v1/sessions/{session_id}", timeout=30)
        response.raise_for_status()
        return int(response.headers["x-served-by"].removeprefix("replica")) - 1


def create(client: Client, size: int, *, hold: bool = False) -> Session:
    params: Any = {"w": np.zeros(size, np.float32)} if hold else {"w": (size,)}
    return client.create_session(ADAM, params, dtype="float32")


def gradients(size: int, count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    return [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]


# -- 1. step latency -------------------------------------------------------------------


def steps_for(size: int) -> int:
    return int(max(60, min(200, 2e7 // size)))


def wire_bytes(url: str, session_id: str, grad: np.ndarray) -> tuple[int, int]:
    """Request and reply body bytes of one safetensors step (the step is applied)."""
    body = wire.encode({"w": grad})
    response = httpx.post(
        f"{url}/v1/sessions/{session_id}/step",
        content=body,
        headers={"content-type": SAFETENSORS, "accept": SAFETENSORS},
        timeout=60,
    )
    response.raise_for_status()
    return len(body), len(response.content)


def step_latency(
    sizes: Sequence[int], targets: dict[str, str], echo: EchoClient
) -> list[tuple[int, int, dict[str, list[float]]]]:
    rows = []
    clients = {name: Client(url) for name, url in targets.items()}
    try:
        for size in sizes:
            sessions = {name: create(client, size) for name, client in clients.items()}
            grads = gradients(size)
            first = next(iter(targets))
            request_bytes, reply_bytes = wire_bytes(targets[first], sessions[first].id, grads[0])
            samples: dict[str, list[float]] = defaultdict(list)
            names = [*sessions, "floor"]
            count = steps_for(size)
            for i in range(count + 3):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    if name == "floor":
                        elapsed = echo.round_trip(request_bytes, reply_bytes)
                    else:
                        start = time.perf_counter()
                        sessions[name].step(grads[i % 2])
                        elapsed = time.perf_counter() - start
                    if i >= 3:  # the first steps warm up connections and caches
                        samples[name].append(elapsed)
            for session in sessions.values():
                session.delete()
            note(
                f"  step latency {size:>9,d}: "
                + ", ".join(f"{name} {ms(values, 0.5):.2f}" for name, values in samples.items())
            )
            rows.append((size, request_bytes, samples))
    finally:
        for client in clients.values():
            client.close()
    return rows


def print_latency(rows: list[tuple[int, int, dict[str, list[float]]]]) -> None:
    names = [name for name in rows[0][2] if name != "floor"]
    print(
        "\n**Step latency**, float32 Adam holding no params, `optserve_client.Client`, "
        "safetensors; ms (p50 / p90)\n"
    )
    print("| params | request | steps | " + " | ".join(names) + " | TCP floor, same bytes |")
    print("|---:|---:|---:|" + "---:|" * (len(names) + 1))
    for size, request_bytes, samples in rows:
        cells = [
            f"{ms(samples[n], 0.5):.2f} / {ms(samples[n], 0.9):.2f}" for n in [*names, "floor"]
        ]
        steps = len(samples[names[0]])
        print(
            f"| {size:,} | {request_bytes / 1024:,.0f} KiB | {steps} | " + " | ".join(cells) + " |"
        )
    print("\nEach step of each column in turn (the order rotating), on the same machine.")


# -- 2. sessions under a memory budget ---------------------------------------------------


def disk_usage(path: Path) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(directory, name)).st_blocks * 512
    return total


def evicted(log: Path) -> list[str]:
    """The ids of the sessions the server logged as evicted, in order."""
    ids = []
    for line in log.read_text(errors="replace").splitlines():
        if '"session evicted"' in line:
            ids.append(json.loads(line)["session"])
    return ids


@dataclass
class BudgetRun:
    sessions: int
    params: int
    budget: int
    fill_s: float
    stored_bytes: int
    held: int
    evictions: int
    rss_empty: int
    rss_end: int
    rss_peak: int
    start_s: float
    warm: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)


def memory_budget(workdir: Path, sessions: int, size: int, budget: int, cold: int) -> BudgetRun:
    workdir.mkdir(parents=True, exist_ok=True)
    logs = Logs(workdir)
    env = {
        "OPTSERVE_MEMORY_BUDGET": str(budget),
        "OPTSERVE_MAX_SESSIONS_PER_TENANT": str(sessions + 10),
        "OPTSERVE_LOG_LEVEL": "debug",  # one line per eviction, with the session's id
    }
    server = ServerProcess(workdir / "data", logs.open("server.log"), env)
    try:
        server.start()
        assert server.process is not None
        pid = server.process.pid
        rss_empty = memory(pid)["VmRSS"]
        grads = gradients(size)
        stored: list[Session] = []
        began = time.monotonic()
        with Client(server.url) as client:
            for n in range(sessions):
                session = create(client, size, hold=True)
                session.step(grads[n % 2])
                stored.append(session)
                if (n + 1) % 250 == 0:
                    note(f"  memory budget: {n + 1} sessions stored")
            fill_s = time.monotonic() - began
            out = set(evicted(workdir / "server.log"))
            # The oldest sessions were evicted long ago: each is loaded (once) for its step.
            cold_sessions = [s for s in stored if s.id in out][:cold]
            warm = stored[-1]
            run = BudgetRun(
                sessions, size, budget, fill_s, 0, 0, 0, rss_empty, 0, 0, server.start_seconds[0]
            )
            for n, loaded in enumerate(cold_sessions):
                start = time.perf_counter()
                warm.step(grads[n % 2])
                run.warm.append(time.perf_counter() - start)
                start = time.perf_counter()
                loaded.step(grads[n % 2])
                run.cold.append(time.perf_counter() - start)
        time.sleep(0.5)  # the log lines of the last evictions
        run.evictions = len(evicted(workdir / "server.log"))
        run.held = sessions + len(cold_sessions) - run.evictions
        held = memory(pid)
        run.rss_end, run.rss_peak = held["VmRSS"], held["VmHWM"]
        run.stored_bytes = disk_usage(workdir / "data")
        return run
    finally:
        server.stop()
        logs.close()


def print_budget(run: BudgetRun) -> None:
    state = 3 * 4 * run.params  # params, exp_avg, exp_avg_sq
    mib = 1 << 20
    print(
        f"\n**Sessions under a memory budget**: one disk server, `OPTSERVE_MEMORY_BUDGET` "
        f"{run.budget / mib:.0f} MiB, float32 Adam sessions of {run.params:,} params held "
        f"by the server ({state / mib:.2f} MiB of state each)\n"
    )
    print("| | |\n|---|---:|")
    rows = [
        ("sessions stored", f"{run.sessions:,} ({run.sessions * state / 1e9:.1f} GB of state)"),
        ("on disk", f"{run.stored_bytes / 1e9:.2f} GB"),
        ("created and stepped once, in", f"{run.fill_s:.0f} s"),
        ("sessions in memory at the end", f"{run.held} (budget / state: {run.budget // state})"),
        ("evictions", f"{run.evictions:,}"),
        ("RSS, empty server", f"{run.rss_empty / mib:.0f} MiB"),
        ("RSS at the end", f"{run.rss_end / mib:.0f} MiB"),
        ("RSS, peak (VmHWM)", f"{run.rss_peak / mib:.0f} MiB"),
        (
            "step, session in memory (p50 / p90)",
            f"{ms(run.warm, 0.5):.2f} / {ms(run.warm, 0.9):.2f} ms",
        ),
        (
            "step, session loaded first (p50 / p90)",
            f"{ms(run.cold, 0.5):.2f} / {ms(run.cold, 0.9):.2f} ms",
        ),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(
        f"\n{len(run.cold)} steps of each kind, in turn; a loaded session's step includes "
        "reading its snapshot and evicting the least recently used session (with its "
        "snapshot) to make room."
    )


# -- 3. takeover -------------------------------------------------------------------------


class ServedBy(httpx.HTTPTransport):
    """The client's transport, noting which replica answered the last response."""

    last: str = ""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.last = response.headers.get("x-served-by", "")
        return response


@dataclass(frozen=True)
class Step:
    started: float
    """Monotonic seconds of its first try."""
    acked: float
    replayed: bool
    served_by: str


class Stepper(threading.Thread):
    """Steps one session through the proxy as fast as it is answered, recording each step."""

    def __init__(self, url: str, document: dict[str, Any], size: int) -> None:
        super().__init__(daemon=True)
        # Retries every 0.25 s at most (Retry-After: 1 is capped by max_backoff), for as
        # long as a takeover may take: the client's own retry loop, key and all.
        policy = RetryPolicy(attempts=100_000, backoff=0.05, max_backoff=0.25)
        self.transport = ServedBy()
        self.client = Client(url, retry=policy, timeout=30, transport=self.transport)
        self.session = Session(self.client, document)
        self.grads = gradients(size)
        self.steps: list[Step] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                start = time.monotonic()
                result = self.session.step(self.grads[len(self.steps) % 2])
                acked = time.monotonic()
                self.steps.append(Step(start, acked, result.replayed, self.transport.last))
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()

    def first_ack_after(self, moment: float, killed: str, timeout_s: float = 120) -> Step:
        """The first step acknowledged after ``moment`` by another replica than ``killed``
        (a reply the killed replica had already sent when it died shows no takeover)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the stepping client failed: {self.error!r}")
            for step in self.steps[-5:]:
                if step.acked > moment and step.served_by != killed:
                    return step
            time.sleep(0.01)
        raise RuntimeError("no step was acknowledged after the kill")

    def first_ack_by(self, replica: str, timeout_s: float) -> Step:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the stepping client failed: {self.error!r}")
            if self.steps and self.steps[-1].served_by == replica:
                return self.steps[-1]
            time.sleep(0.01)
        raise RuntimeError(f"the session did not move back to {replica}")

    def longest_between(self, begin: float, end: float) -> float:
        spans = [s.acked - s.started for s in self.steps if begin <= s.started < end]
        return max(spans, default=0.0)


@dataclass
class Startup:
    """One start of a replica: seconds from the process's start to each phase."""

    ready_s: float
    up_s: float
    cpu_s: float
    """CPU time (user + system) the process had used when ``/readyz`` answered 200."""
    serving_s: float | None = None
    """uvicorn's "Started server process": imports, the database check, the app built."""
    store_s: float | None = None
    """"opened the store": the pool, the schema migration, the catalog read."""
    listening_s: float | None = None
    imports_s: float | None = None
    by_package: dict[str, float] = field(default_factory=dict)
    by_module: dict[str, float] = field(default_factory=dict)


def log_time(line: str) -> float:
    stamp = json.loads(line)["ts"]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def read_startup(text: str, began: float, startup: Startup) -> None:
    """The phases of a start from the replica's info log lines, and the ``-X importtime``
    report if there is one (self time grouped by top-level package)."""
    imports: dict[str, float] = defaultdict(float)
    modules: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("import time:"):
            parts = line.removeprefix("import time:").split("|")
            if len(parts) == 3 and parts[0].strip().isdigit():
                name, own = parts[2].strip(), int(parts[0]) / 1e6
                imports[name.split(".")[0]] += own
                modules[name] = own
        elif '"Started server process' in line:
            startup.serving_s = log_time(line) - began
        elif '"opened the store"' in line:
            startup.store_s = log_time(line) - began
        elif '"Uvicorn running on' in line:
            startup.listening_s = log_time(line) - began
    if imports:
        startup.imports_s = sum(imports.values())
        startup.by_package = dict(sorted(imports.items(), key=lambda kv: -kv[1]))
        startup.by_module = dict(sorted(modules.items(), key=lambda kv: -kv[1]))


def restart(replicas: Replicas, index: int, importtime: bool = False) -> Startup:
    replica = replicas.replicas[index]
    assert replicas.proxy is not None
    log = replicas.log_path(index)
    offset = log.stat().st_size
    if importtime:
        replica.env["PYTHONPROFILEIMPORTTIME"] = "1"
    began_wall, began = time.time(), time.monotonic()
    try:
        replica.start()
    finally:
        replica.env.pop("PYTHONPROFILEIMPORTTIME", None)
    assert replica.process is not None
    cpu_s = cpu_seconds(replica.process.pid)
    replicas.proxy.wait_servers_up(30, f"replica{index + 1}")
    startup = Startup(replica.start_seconds[-1], time.monotonic() - began, cpu_s)
    with open(log, encoding="utf-8", errors="replace") as file:
        file.seek(offset)
        read_startup(file.read(), began_wall, startup)
    return startup


@dataclass
class TakeoverRun:
    lease_seconds: float
    takeover_s: list[float] = field(default_factory=list)
    replayed: int = 0
    failback_s: list[float] = field(default_factory=list)
    startups: list[Startup] = field(default_factory=list)
    probe: Startup | None = None
    python_s: tuple[float, float] = (0.0, 0.0)
    imports_s: tuple[float, float] = (0.0, 0.0)
    """``python -c 'import ...'`` of what ``serve`` imports, without the profiler."""


SERVE_IMPORTS = (
    "service.cli",
    "uvicorn",
    "service.api.app",
    "service.api.server",
    "service.sessions.store.postgres",
)
"""What ``optserve serve --storage postgres`` imports before it serves."""


def python_seconds(code: str) -> tuple[float, float]:
    """Wall and CPU time (user + system) of ``python -c code`` in this checkout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def takeover(
    workdir: Path, lease_seconds: float, repetitions: int, size: int, probe: bool
) -> TakeoverRun:
    run = TakeoverRun(lease_seconds)
    with Replicas(workdir, 3, lease_seconds) as replicas:
        with Client(replicas.url) as client:
            document = create(client, size).document
        session_id = document["id"]
        stepper = Stepper(replicas.url, document, size)
        stepper.start()
        try:
            time.sleep(2)
            for rep in range(repetitions):
                time.sleep(random.uniform(1.0, 2.0))  # a kill at any point of a step
                holder = replicas.served_by(session_id)
                killed_at = time.monotonic()
                replicas.replicas[holder].kill()
                step = stepper.first_ack_after(killed_at, f"replica{holder + 1}")
                run.takeover_s.append(step.acked - killed_at)
                run.replayed += step.replayed
                restarted_at = time.monotonic()
                startup = restart(replicas, holder)
                run.startups.append(startup)
                # Once HAProxy has the replica UP again, the session's requests go back
                # to it, and it must take the session from the interim holder.
                stepper.first_ack_by(f"replica{holder + 1}", timeout_s=3 * lease_seconds + 30)
                time.sleep(1.0)
                run.failback_s.append(stepper.longest_between(restarted_at, time.monotonic()))
                note(
                    f"  takeover, lease {lease_seconds:g} s, #{rep + 1}: "
                    f"{run.takeover_s[-1]:.2f} s; restart ready {startup.ready_s:.2f} s, "
                    f"failback {run.failback_s[-1]:.2f} s"
                )
            if probe:
                others = [n for n in range(3) if n != replicas.served_by(session_id)]
                replicas.replicas[others[0]].kill()
                run.probe = restart(replicas, others[0], importtime=True)
                run.python_s = python_seconds("pass")
                run.imports_s = python_seconds(f"import {', '.join(SERVE_IMPORTS)}")
        finally:
            stepper.done.set()
            stepper.join(timeout=120)
    return run


def print_takeover(runs: list[TakeoverRun], size: int) -> None:
    print(
        f"\n**Takeover** of a {size:,}-param float32 Adam session: 3 replicas on PostgreSQL "
        "behind HAProxy, the replica holding it SIGKILLed while a client steps it "
        "through the proxy; seconds\n"
    )
    print(
        "| `OPTSERVE_LEASE_SECONDS` | kill to next step acknowledged | median "
        "| killed replica: start to `/readyz` 200 | to UP in HAProxy "
        "| longest step while it moves back |"
    )
    print("|---:|---|---:|---|---|---|")
    for run in runs:
        print(
            f"| {run.lease_seconds:g} | {seconds(run.takeover_s)} "
            f"| {float(np.median(run.takeover_s)):.1f} "
            f"| {seconds([s.ready_s for s in run.startups])} "
            f"| {seconds([s.up_s for s in run.startups])} | {seconds(run.failback_s)} |"
        )
    replayed = sum(run.replayed for run in runs)
    print(
        f"\n{replayed} of {sum(len(r.takeover_s) for r in runs)} steps acknowledged after a "
        "kill were answered from the idempotency record (applied by the killed replica "
        "before it died, retried with the same key)."
    )
    starts = [s for run in runs for s in run.startups]
    phases = [
        ("to uvicorn's start (interpreter, imports, database check, app)", "serving_s"),
        ("to the store opened (pool, migrations, catalog)", "store_s"),
        ("to listening", "listening_s"),
        ("to `/readyz` 200", "ready_s"),
        ("CPU time used by then", "cpu_s"),
        ("to UP in HAProxy", "up_s"),
    ]
    print("\n**Where a replica's start goes** (seconds from the process's start, under load)\n")
    print("| phase | median of the restarts above | one restart under `-X importtime` |")
    print("|---|---:|---:|")
    probe = next((run.probe for run in runs if run.probe is not None), None)
    for label, name in phases:
        values = [getattr(s, name) for s in starts if getattr(s, name) is not None]
        median = f"{float(np.median(values)):.2f}" if values else "n/a"
        value = getattr(probe, name) if probe is not None else None
        print(
            f"| {label} | {median} | {value:.2f} |"
            if value is not None
            else f"| {label} | {median} | |"
        )
    if probe is not None and probe.imports_s is not None:
        probed = next(run for run in runs if run.probe is not None)
        packages = ", ".join(f"{n} {s:.2f}" for n, s in list(probe.by_package.items())[:8])
        modules = ", ".join(f"{n} {s:.2f}" for n, s in list(probe.by_module.items())[:6])
        print(
            f"\nImports under `-X importtime` (which slows them): {probe.imports_s:.2f} s in "
            f"all; self time by top-level package: {packages}; the slowest modules: "
            f"{modules}. At the same moment, without the profiler, `python -c pass` took "
            f"{probed.python_s[0]:.2f} s ({probed.python_s[1]:.2f} s of CPU) and "
            f"`python -c 'import {', '.join(SERVE_IMPORTS)}'` {probed.imports_s[0]:.2f} s "
            f"({probed.imports_s[1]:.2f} s of CPU)."
        )


# -- main --------------------------------------------------------------------------------


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({model or platform.machine()}), "
        f"{memory:.0f} GiB, Python {platform.python_version()}; load average {load}"
    )


@contextlib.contextmanager
def latency_targets(workdir: Path) -> Iterator[dict[str, str]]:
    logs = Logs(workdir)
    disk = ServerProcess(workdir / "disk-data", logs.open("disk.log"))
    try:
        disk.start()
        with Replicas(workdir / "replicas", 3, 10) as replicas:
            yield {
                "disk server": disk.url,
                "PostgreSQL, one replica direct": replicas.replicas[0].url,
                "PostgreSQL, HAProxy + 3 replicas": replicas.url,
            }
    finally:
        disk.stop()
        logs.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e3,1e5,1e6", help="params, table 1")
    parser.add_argument("--budget-sessions", type=int, default=1000)
    parser.add_argument("--budget-params", type=int, default=100_000)
    parser.add_argument("--budget-mib", type=float, default=64)
    parser.add_argument("--cold-steps", type=int, default=50)
    parser.add_argument("--leases", default="3,10", help="OPTSERVE_LEASE_SECONDS, table 3")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--takeover-params", type=int, default=1_000_000)
    parser.add_argument("--tables", default="1,2,3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    tables = {int(t) for t in args.tables.split(",")}
    print(f"Measured on {machine()}")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optserve-bench-replicas-") as tmp:
        workdir = Path(tmp)
        if 1 in tables:
            echo = EchoServer(free_port())
            try:
                echo_client = echo.client()
                with latency_targets(workdir / "latency") as targets:
                    sizes = [int(float(s)) for s in args.sizes.split(",")]
                    print_latency(step_latency(sizes, targets, echo_client))
                echo_client.close()
            finally:
                echo.stop()
        if 2 in tables:
            budget = int(args.budget_mib * (1 << 20))
            print_budget(
                memory_budget(
                    workdir / "budget",
                    args.budget_sessions,
                    args.budget_params,
                    budget,
                    args.cold_steps,
                )
            )
        if 3 in tables:
            leases = [float(s) for s in args.leases.split(",")]
            runs = [
                takeover(
                    workdir / f"takeover-{lease:g}",
                    lease,
                    args.repetitions,
                    args.takeover_params,
                    probe=n == len(leases) - 1,
                )
                for n, lease in enumerate(leases)
            ]
            print_takeover(runs, args.takeover_params)
    print(
        f"\nOne run, {time.monotonic() - began:.0f} s; load average at the end "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
