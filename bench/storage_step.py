"""Per-step time through each durable store: disk vs PostgreSQL, in process.

A step of an Adam session of ``size`` float32 parameters through the session service
(checks, the event's durable append overlapped with the update, background snapshots
and compaction), and the bare store append of that step's event. The stores step in
turn, interleaved, so that a busy machine slows them alike. Prints a Markdown table of
medians and 90th percentiles, in milliseconds.

    python -m bench.storage_step [--sizes 1000 100000 1000000] [--steps 40]
                                 [--database-url postgresql://...]

Without ``--database-url`` a throwaway PostgreSQL cluster is started from the machine's
``initdb``/``pg_ctl`` (as the tests do; ``fsync`` and ``synchronous_commit`` on, the
defaults) and removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from service.sessions.models import Limits, StepRequest
from service.sessions.runtime import Runtime
from service.sessions.service import SessionService
from service.sessions.store import DiskStore, Event, Store
from service.sessions.store.postgres import PostgresStore


def config(size: int) -> dict[str, Any]:
    return {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [size]}}}


@contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from tests.postgres_cluster import Cluster, bin_dir

    binaries = bin_dir()
    if binaries is None:
        raise SystemExit("no PostgreSQL binaries found: pass --database-url")
    cluster = Cluster(binaries)
    try:
        cluster.init()
        cluster.start()
        yield cluster.url
    finally:
        cluster.remove()


def ms(values: list[float], q: float) -> float:
    return 1000 * float(np.quantile(values, q))


async def measure(size: int, steps: int, stores: dict[str, Store]) -> dict[str, list[float]]:
    limits = Limits(max_elements_per_session=10**9)
    services = {k: SessionService(Runtime(s), limits) for k, s in stores.items()}
    for service in services.values():
        await service.start()
    times: dict[str, list[float]] = {f"{k} step": [] for k in services}
    times.update({f"{k} append": [] for k in services})
    try:
        ids = {k: (await s.create("bench", config(size), None)).id for k, s in services.items()}
        # The bare appends go to a session of their own, so both stay consecutive.
        bare = {k: (await s.create("bench", config(size), None)).id for k, s in services.items()}
        rng = np.random.default_rng(0)
        for i in range(steps):
            g = rng.standard_normal(size, dtype=np.float32)
            order = list(services) if i % 2 else list(reversed(services))
            for kind in order:
                request = StepRequest(grads={"w": g}, idempotency_key=f"k{i}", fingerprint=str(i))
                start = time.perf_counter()
                await services[kind].step("bench", ids[kind], request)
                times[f"{kind} step"].append(time.perf_counter() - start)
            for kind in order:
                event = Event(seq=i + 1, kind="step", at=time.time(), grads={"w": g})
                start = time.perf_counter()
                stores[kind].append(bare[kind], event)
                times[f"{kind} append"].append(time.perf_counter() - start)
    finally:
        for service in services.values():
            await service.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with database(args.database_url) as url, tempfile.TemporaryDirectory() as tmp:
        print("| params | event | store | step p50 | step p90 | append p50 | append p90 |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        for size in args.sizes:
            stores: dict[str, Store] = {
                "disk": DiskStore(Path(tmp) / f"disk-{uuid.uuid4().hex}"),
                "postgres": PostgresStore(url),
            }
            times = asyncio.run(measure(size, args.steps, stores))
            for kind in stores:
                step, append = times[f"{kind} step"], times[f"{kind} append"]
                print(
                    f"| {size:,} | {4 * size / 1024:,.0f} KiB | {kind} "
                    f"| {ms(step, 0.5):.2f} | {ms(step, 0.9):.2f} "
                    f"| {ms(append, 0.5):.2f} | {ms(append, 0.9):.2f} |"
                )


if __name__ == "__main__":
    main()
