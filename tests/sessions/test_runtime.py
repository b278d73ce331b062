"""The runtime loads sessions lazily and evicts them, without changing a single number.

A service under a small memory budget (or a short idle time) holds only a few sessions at
once; each session it evicts and loads again continues bit for bit like a twin that was
never evicted, and a retry of its last keyed step still gets the stored answer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.sessions.models import StepRequest
from service.sessions.store import DiskStore
from tests.sessions.conftest import grads_for, running

pytestmark = pytest.mark.anyio

SHAPES = {"w": (64, 32), "b": (32,)}
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "Adam", "lr": 0.01, "weight_decay": 0.01},
    "schedule": {"name": "StepLR", "step_size": 3, "gamma": 0.5},
    "params": {name: {"shape": list(shape)} for name, shape in SHAPES.items()},
    "dtype": "float64",
}
INITIAL = grads_for(SHAPES, seed=99, dtype=np.float64)
STATE_BYTES = 3 * sum(int(np.prod(s)) for s in SHAPES.values()) * 8
"""Held params and Adam's two moments, in float64."""


def request(i: int, key: str | None = None) -> StepRequest:
    grads = grads_for(SHAPES, seed=i, dtype=np.float64)
    return StepRequest(grads=grads, idempotency_key=key, fingerprint=f"f{i}")


async def test_a_budget_holds_few_sessions_and_each_continues_exactly(tmp_path: Path) -> None:
    budget = int(3.5 * STATE_BYTES)
    sessions = 12
    async with (
        running(DiskStore(tmp_path / "evicting"), memory_budget=budget) as small,
        running(DiskStore(tmp_path / "twin")) as twin,
    ):
        ids = [
            (
                (await small.create("t", CONFIG, INITIAL)).id,
                (await twin.create("t", CONFIG, INITIAL)).id,
            )
            for _ in range(sessions)
        ]
        for i in range(4):
            for n, (a, b) in enumerate(ids):
                got = await small.step("t", a, request(100 * n + i))
                want = await twin.step("t", b, request(100 * n + i))
                assert got.tensors is not None and want.tensors is not None
                for name in SHAPES:
                    np.testing.assert_array_equal(got.tensors[name], want.tensors[name])
                assert small.runtime.loaded_bytes() <= budget
                assert len(small.runtime.loaded()) <= 3
        for a, b in ids:
            x, y = await small.params("t", a), await twin.params("t", b)
            for name in SHAPES:
                np.testing.assert_array_equal(x[name], y[name])


async def test_an_idle_session_is_evicted_and_its_last_answer_survives(tmp_path: Path) -> None:
    async with running(DiskStore(tmp_path / "data"), idle_evict_s=0.05) as service:
        sid = (await service.create("t", CONFIG, INITIAL)).id
        first = await service.step("t", sid, request(1, key="k1"))
        for _ in range(200):
            if not service.runtime.loaded():
                break
            await asyncio.sleep(0.02)
        assert service.runtime.loaded() == []
        again = await service.step("t", sid, request(1, key="k1"))
        assert again.replayed and again.step == first.step == 1
        assert first.tensors is not None and again.tensors is not None
        for name in SHAPES:
            np.testing.assert_array_equal(again.tensors[name], first.tensors[name])
        assert (await service.step("t", sid, request(2, key="k2"))).step == 2


async def test_a_restart_loads_nothing_until_a_session_is_used(tmp_path: Path) -> None:
    store = tmp_path / "data"
    async with running(DiskStore(store)) as service:
        ids = [(await service.create("t", CONFIG, INITIAL)).id for _ in range(5)]
        await service.step("t", ids[2], request(7))
    async with running(DiskStore(store)) as service:
        assert service.runtime.loaded() == []
        assert service.runtime.per_tenant["t"] == 5
        listed, _ = await service.list("t", 2, None)
        assert [i.id for i in listed] == sorted(ids)[:2]
        assert (await service.get("t", ids[2])).step == 1
