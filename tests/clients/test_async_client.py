"""The asyncio client speaks the same protocol, with the same retries and errors."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from optserve_client import AsyncClient, RetryPolicy, ServerError, SessionNotFound
from optserve_client._wire import Wire

from tests.clients.fake_server import FakeServer

FAST = RetryPolicy(attempts=3, backoff=0.0, jitter=False)


@pytest.mark.parametrize("wire", ["safetensors", "json"])
def test_async_session_round_trip(wire: Wire) -> None:
    server = FakeServer()

    async def scenario() -> None:
        async with AsyncClient(
            "http://optserve.test", wire=wire, retry=FAST, transport=server.async_transport()
        ) as client:
            session = await client.create_session(
                {"name": "SGD", "lr": 0.5}, {"w": np.array([1.0, 2.0])}, dtype="float64"
            )
            assert session.holds_params
            server.fail_next(httpx.ConnectError("refused"))
            result = await session.step({"w": np.array([2.0, 2.0])}, returns="params")
            assert result.params is not None
            np.testing.assert_array_equal(result.params["w"], [0.0, 1.0])
            np.testing.assert_array_equal((await session.params())["w"], [0.0, 1.0])
            assert (await session.refresh()).step_count == 1
            listed = [s.id async for s in client.sessions()]
            assert listed == [session.id]
            await session.delete()
            with pytest.raises(SessionNotFound):
                await client.session(session.id)

    asyncio.run(scenario())
    step_keys = [
        r.headers["idempotency-key"] for r in server.requests if r.url.path.endswith("step")
    ]
    assert len(step_keys) == 2 and len(set(step_keys)) == 1


def test_async_retries_are_bounded_and_typed() -> None:
    server = FakeServer()

    async def scenario() -> None:
        async with AsyncClient(retry=FAST, transport=server.async_transport()) as client:
            session = await client.create_session({"name": "SGD"}, {"x": (1,)})
            server.fail_next(500, 500, 500)
            with pytest.raises(ServerError):
                await session.step(np.array([1.0]))

    asyncio.run(scenario())
    assert sum(r.url.path.endswith("step") for r in server.requests) == 3


def test_async_lost_reply_is_replayed() -> None:
    server = FakeServer()

    async def scenario() -> None:
        async with AsyncClient(retry=FAST, transport=server.async_transport()) as client:
            session = await client.create_session({"name": "SGD", "lr": 1.0}, {"x": (1,)})
            server.lose_next_replies(1)
            result = await session.step(np.array([3.0]))
            assert result.replayed and result.step == 1
            assert result.deltas is not None and result.deltas["x"][0] == -3.0

    asyncio.run(scenario())
