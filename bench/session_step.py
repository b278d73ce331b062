"""Per-step time of the session layer, in process: core alone, memory store, disk store.

This is the storage half of the HTTP benchmark: no HTTP, no codec, just what a step costs
below the API (checks, idempotency, the event log append with ``fdatasync`` overlapped
with the update, background snapshots). The three variants step in turn, interleaved,
so that a busy machine slows them alike; the table gives medians and the median of the
per-step disk/memory ratios. Prints a Markdown table.

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
from service.sessions.runtime import Runtime
from service.sessions.service import SessionService
from service.sessions.store import DiskStore, MemoryStore


def config(size: int) -> dict[str, Any]:
    return {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [size]}}}


async def measure(size: int, steps: int, data_dir: Path) -> tuple[float, float, float, float]:
    plan = plan_from_config(config(size))
    state = initial_state(plan)
    out = [np.empty(size, dtype=np.float32)]
    limits = Limits(max_elements_per_session=10**9)
    memory = SessionService(Runtime(MemoryStore(keep_history=False)), limits)
    disk = SessionService(Runtime(DiskStore(data_dir)), limits)
    services = {"memory": memory, "disk": disk}
    for service in services.values():
        await service.start()
    try:
        ids = {k: (await s.create("bench", config(size), None)).id for k, s in services.items()}
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {"core": [], "memory": [], "disk": []}
        for i in range(steps):
            g = rng.standard_normal(size, dtype=np.float32)
            start = time.perf_counter()
            apply_step(plan, state, [g], None, out)
            times["core"].append(time.perf_counter() - start)
            order = ("memory", "disk") if i % 2 else ("disk", "memory")
            for kind in order:
                request = StepRequest(grads={"w": g}, idempotency_key=f"k{i}", fingerprint=str(i))
                start = time.perf_counter()
                await services[kind].step("bench", ids[kind], request)
                times[kind].append(time.perf_counter() - start)
        ratios = [d / m for d, m in zip(times["disk"], times["memory"], strict=True)]
        medians = [statistics.median(times[k]) * 1e3 for k in ("core", "memory", "disk")]
        return medians[0], medians[1], medians[2], statistics.median(ratios)
    finally:
        for service in services.values():
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
        with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
            core, memory, disk, ratio = asyncio.run(measure(size, args.steps, Path(tmp)))
        print(f"| {size:,} | {core:.3f} | {memory:.3f} | {disk:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
