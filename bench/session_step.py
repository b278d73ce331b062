"""Per-step time of the session layer, in process: core alone, memory store, disk store.

This is the storage half of the HTTP benchmark: no HTTP, no codec, just what a step costs
below the API (checks, the event log append with fdatasync overlapped with the update,
background snapshots). Prints a Markdown table.

    python -m bench.session_step [--sizes 1000 1000000] [--steps 50] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state
from service.sessions.models import Limits, StepRequest
from service.sessions.service import SessionService
from service.sessions.store import DiskStore, MemoryStore, Store


def config(size: int) -> dict[str, Any]:
    return {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [size]}}}


def grads(size: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]


def core_ms(size: int, steps: int) -> float:
    plan = plan_from_config(config(size))
    state = initial_state(plan)
    out = [np.empty(size, dtype=np.float32)]
    times = []
    for g in grads(size, steps):
        start = time.perf_counter()
        apply_step(plan, state, [g], None, out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


async def session_ms(store: Store, size: int, steps: int) -> float:
    service = SessionService(store, Limits(max_elements_per_session=10**9))
    await service.start()
    try:
        sid = (await service.create("bench", config(size), None)).id
        times = []
        for i, g in enumerate(grads(size, steps)):
            request = StepRequest(grads={"w": g}, idempotency_key=f"k{i}", fingerprint=str(i))
            start = time.perf_counter()
            await service.step("bench", sid, request)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the disk store writes")
    args = parser.parse_args()
    print("| params | Adam in core (ms) | memory store (ms) | disk store (ms) | disk / memory |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        core = core_ms(size, args.steps)
        memory = asyncio.run(session_ms(MemoryStore(keep_history=False), size, args.steps))
        with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
            disk = asyncio.run(session_ms(DiskStore(tmp), size, args.steps))
        print(f"| {size:,} | {core:.3f} | {memory:.3f} | {disk:.3f} | {disk / memory:.2f}x |")


if __name__ == "__main__":
    main()
