"""Shared helpers for the sessions tests: stores of both kinds and running services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.sessions.models import Limits
from service.sessions.runtime import Runtime
from service.sessions.service import SessionService
from service.sessions.store import DiskStore, MemoryStore, Store

StoreFactory = Callable[[], Store]
"""Makes the store again on the same backing (a restart of the process, for disk)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "disk", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    if request.param == "postgres":
        from service.sessions.store.postgres import PostgresStore

        url: str = request.getfixturevalue("postgres_url")
        return lambda: PostgresStore(url, pool_size=4)
    return lambda: DiskStore(tmp_path / "data")


@asynccontextmanager
async def running(
    store: Store, limits: Limits | None = None, **options: Any
) -> AsyncIterator[SessionService]:
    service = SessionService(Runtime(store, **options), limits or Limits())
    await service.start()
    try:
        yield service
    finally:
        await service.close()


def grads_for(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


async def settle(service: SessionService) -> None:
    """Wait for background snapshots and compaction (they are on no reply's path)."""
    for _ in range(2000):
        tasks = [e.background for e in service.runtime.loaded() if e.background is not None]
        if all(t.done() for t in tasks):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("background snapshots did not finish")
