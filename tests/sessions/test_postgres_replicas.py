"""Two session services (two replicas) on one PostgreSQL database.

A replica loads and steps a session only under its lease: another replica asking for it
is answered 503 (retried by clients) until the lease is given up or expires, and then
loads the session from the database, under a new lease, at exactly its last step. A
replica whose lease was taken over never commits a step from its stale memory: it drops
the session and is answered 503 like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from service.sessions.errors import StorageError
from service.sessions.models import Limits, StepRequest
from service.sessions.runtime import Runtime
from service.sessions.service import SessionService
from service.sessions.store.postgres import PostgresStore
from tests.sessions.conftest import grads_for, running
from tests.sessions.reference import core_params
from tests.sessions.test_federated import START as FED_START
from tests.sessions.test_federated import rounds_config, update

pytestmark = pytest.mark.anyio

SHAPES = {"w": (3, 2)}
CONFIG = {
    "optimizer": {"name": "Adam", "lr": 0.1},
    "params": {"w": {"shape": [3, 2]}},
}


def request(i: int) -> StepRequest:
    return StepRequest(grads=grads_for(SHAPES, seed=i), idempotency_key=f"k{i}", fingerprint=str(i))


async def test_a_session_moves_to_another_replica_under_a_new_lease(postgres_url: str) -> None:
    start = {"w": np.zeros((3, 2), dtype=np.float32)}
    a = SessionService(Runtime(PostgresStore(postgres_url), lease_ttl=30), Limits())
    await a.start()
    a_open = True
    try:
        sid = (await a.create("t", CONFIG, start)).id
        await a.step("t", sid, request(0))
        async with running(PostgresStore(postgres_url), lease_ttl=30) as b:
            with pytest.raises(StorageError, match="another replica serves"):
                await b.step("t", sid, request(1))
            await a.step("t", sid, request(1))
            await a.close()  # gives its leases up
            a_open = False
            assert (await b.get("t", sid)).step == 2
            assert (await b.step("t", sid, request(2))).step == 3
            params = await b.params("t", sid)
    finally:
        if a_open:
            await a.close()
    expected = core_params(CONFIG, start, [request(i).grads for i in range(3)])
    np.testing.assert_array_equal(params["w"], expected["w"])


async def test_a_replica_whose_lease_was_taken_over_never_commits(postgres_url: str) -> None:
    start = {"w": np.zeros((3, 2), dtype=np.float32)}
    async with (
        running(PostgresStore(postgres_url), lease_ttl=0.5, idle_evict_s=3600) as a,
        running(PostgresStore(postgres_url), lease_ttl=30) as b,
    ):
        sid = (await a.create("t", CONFIG, start)).id
        await a.step("t", sid, request(0))
        # a goes quiet past its lease (as if frozen); b takes the session over.
        for _ in range(100):
            try:
                await b.step("t", sid, request(1))
                break
            except StorageError:
                await asyncio.sleep(0.1)
        assert (await b.get("t", sid)).step == 2
        # a's memory says step 1: it is refused, and nothing it computes is stored.
        with pytest.raises(StorageError):
            await a.step("t", sid, request(99))
        assert (await b.step("t", sid, request(2))).step == 3
        params = await b.params("t", sid)
    expected = core_params(CONFIG, start, [request(i).grads for i in range(3)])
    np.testing.assert_array_equal(params["w"], expected["w"])


async def test_a_federated_round_closes_on_the_replica_that_took_its_session_over(
    postgres_url: str,
) -> None:
    aggregation = rounds_config(3, round_timeout_s=0.5, min_clients=2)
    a = SessionService(Runtime(PostgresStore(postgres_url), lease_ttl=0.6), Limits())
    await a.start()
    try:
        sid = (await a.create("t", aggregation, FED_START)).id
        await a.federated.submit("t", sid, update(1))
        await a.federated.stop()  # the owner's timers stop, as if it froze
        await a.federated.submit("t", sid, update(2))
        async with running(PostgresStore(postgres_url), lease_ttl=0.6) as b:
            # a stops renewing; b's sweep takes the session over and runs its timer.
            await a.close()
            polled = None
            for _ in range(60):
                try:
                    polled = await b.federated.params("t", sid, after=1, wait=1)
                except StorageError:
                    await asyncio.sleep(0.1)
                    continue
                if polled is not None:
                    break
            assert polled is not None and polled.round == 2
            _, records, _ = await b.federated.history("t", sid, None, 10)
            assert records[0]["closed_by"] == "timeout"
    finally:
        with contextlib.suppress(Exception):
            await a.close()


async def test_a_listing_on_one_replica_leaves_sessions_where_they_are(postgres_url: str) -> None:
    start = {"w": np.zeros((3, 2), dtype=np.float32)}
    async with (
        running(PostgresStore(postgres_url), lease_ttl=30) as a,
        running(PostgresStore(postgres_url), lease_ttl=30) as b,
    ):
        ids = sorted([(await a.create("t", CONFIG, start)).id for _ in range(3)])
        await a.step("t", ids[1], request(0))
        listed, cursor = await b.list("t", 10, None)
        assert [i.id for i in listed] == ids and cursor is None
        assert [i.step for i in listed] == [0, 1, 0]
        assert b.runtime.loaded() == []
        assert (await a.step("t", ids[1], request(1))).step == 2  # still a's


async def test_a_session_wanted_elsewhere_is_handed_over_before_its_lease_expires(
    postgres_url: str,
) -> None:
    start = {"w": np.zeros((3, 2), dtype=np.float32)}
    async with (
        running(PostgresStore(postgres_url), lease_ttl=20) as a,
        running(PostgresStore(postgres_url), lease_ttl=20) as b,
    ):
        sid = (await a.create("t", CONFIG, start)).id
        await a.step("t", sid, request(0))
        began = time.monotonic()
        with pytest.raises(StorageError, match="another replica serves"):
            await b.step("t", sid, request(1))  # marks it wanted
        while True:
            try:
                reply = await b.step("t", sid, request(1))
                break
            except StorageError:
                assert time.monotonic() - began < 10, "not handed over within half a lease"
                await asyncio.sleep(0.1)
        assert reply.step == 2
        assert a.runtime.loaded() == []
