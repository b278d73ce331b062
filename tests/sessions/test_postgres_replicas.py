"""Two session services (two replicas) on one PostgreSQL database.

Handover between replicas is not built yet; what must already hold is safety: a replica
never steps a session another one holds, and a replica whose memory is behind the
database never commits a step computed from it (the fenced append's head check), but
reloads and then steps from the true state.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.sessions.errors import StorageError
from service.sessions.models import Limits, StepRequest
from service.sessions.service import SessionService
from service.sessions.store.postgres import PostgresStore
from tests.sessions.conftest import grads_for, running
from tests.sessions.reference import core_params

pytestmark = pytest.mark.anyio

SHAPES = {"w": (3, 2)}
CONFIG = {
    "optimizer": {"name": "Adam", "lr": 0.1},
    "params": {"w": {"shape": [3, 2]}},
}


def request(i: int) -> StepRequest:
    return StepRequest(grads=grads_for(SHAPES, seed=i), idempotency_key=f"k{i}", fingerprint=str(i))


async def test_a_replica_behind_the_database_reloads_instead_of_committing(
    postgres_url: str,
) -> None:
    start = {"w": np.zeros((3, 2), dtype=np.float32)}
    a = SessionService(PostgresStore(postgres_url), Limits(), lease_ttl=30)
    await a.start()
    a_open = True
    try:
        sid = (await a.create("t", CONFIG, start)).id
        await a.step("t", sid, request(0))
        async with running(PostgresStore(postgres_url), lease_ttl=30) as b:
            # b loaded the session at step 1; a holds its lease and steps on.
            with pytest.raises(StorageError, match="another replica holds its lease"):
                await b.step("t", sid, request(1))
            await a.step("t", sid, request(1))
            await a.close()  # a's leases are released with its store
            a_open = False
            # b's memory is a step behind: its append is refused by the head check, and
            # it reloads the session from the database rather than commit a wrong step.
            with pytest.raises(StorageError, match="does not follow"):
                await b.step("t", sid, request(2))
            assert (await b.get("t", sid)).step == 2
            reply = await b.step("t", sid, request(2))
            assert reply.step == 3
            params = await b.params("t", sid)
    finally:
        if a_open:
            await a.close()
    expected = core_params(CONFIG, start, [request(i).grads for i in range(3)])
    np.testing.assert_array_equal(params["w"], expected["w"])
