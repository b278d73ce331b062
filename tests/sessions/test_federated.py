"""Federated sessions in the service: rounds closing by count and by timeout, late and
duplicate updates, asynchronous staleness, long polls, and restarts in the middle of a
round (on both stores, with and without snapshots taken mid-round)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.sessions.errors import ParamsRequired
from service.sessions.federated.errors import (
    NotFederated,
    RoundClosed,
    RoundNotOpen,
    StepsNotAccepted,
    UpdateConflict,
    UpdateTooStale,
)
from service.sessions.federated.models import UpdateRequest
from service.sessions.models import StepRequest
from service.sessions.service import SessionService
from service.sessions.store import MemoryStore
from tests.core.flower_scenarios import SCENARIOS, Scenario, Trace, config_for, load_trace
from tests.sessions.conftest import StoreFactory, running, settle

pytestmark = pytest.mark.anyio

SHAPES = {"w": (3, 2), "b": (2,)}
START = {
    "w": np.arange(6, dtype=np.float64).reshape(3, 2) / 10,
    "b": np.array([1.0, -1.0]),
}


def config(aggregation: dict[str, Any], optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "optimizer": optimizer or {"name": "FedAvg"},
        "params": {k: {"shape": list(s)} for k, s in SHAPES.items()},
        "dtype": "float64",
        "aggregation": aggregation,
    }


def rounds_config(k: int = 3, **more: Any) -> dict[str, Any]:
    return config({"mode": "rounds", "clients_per_round": k, **more})


def client_params(client: int, version: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([client, version])
    return {k: v + rng.standard_normal(v.shape) for k, v in START.items()}


def update(client: int, round_: int = 1, n: int = 10, **more: Any) -> UpdateRequest:
    fields: dict[str, Any] = {"form": "params", "tensors": client_params(client), **more}
    return UpdateRequest(client_id=f"c{client}", num_examples=n, round=round_, **fields)


async def held(service: SessionService, sid: str) -> dict[str, np.ndarray]:
    return await service.params("t", sid)


async def replay(
    service: SessionService, scenario: Scenario, trace: Trace
) -> AsyncIterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Flower's recorded client results submitted round by round to a new session; after
    each round, what the session holds and Flower's global model for that round."""
    session = (await service.create("t", config_for(scenario), trace.initial)).id
    for r, results in enumerate(trace.results, start=1):
        for node, n, params in results:
            request = UpdateRequest(f"n{node}", "params", params, num_examples=n, round=r)
            await service.federated.submit("t", session, request)
        yield await held(service, session), trace.globals[r - 1]


def average(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    total = sum(w for _, w in updates)
    return {k: np.sum([p[k] * w for p, w in updates], axis=0) / total for k in SHAPES}


async def test_a_round_closes_when_k_updates_are_in(store_factory: StoreFactory) -> None:
    async with running(store_factory()) as service:
        sid = (await service.create("t", rounds_config(3), START)).id
        first = await service.federated.submit("t", sid, update(1, n=10))
        assert (first.round, first.received, first.round_closed, first.version) == (1, 1, False, 0)
        await service.federated.submit("t", sid, update(2, n=30))
        assert (await service.get("t", sid)).step == 0
        np.testing.assert_array_equal((await held(service, sid))["w"], START["w"])
        third = await service.federated.submit("t", sid, update(3, n=60))
        assert third.round_closed and third.version == 1 and third.received == 3
        expected = average([(client_params(1), 10), (client_params(2), 30), (client_params(3), 60)])
        params = await held(service, sid)
        for name in SHAPES:
            np.testing.assert_allclose(params[name], expected[name], rtol=0, atol=1e-12)
        document = await service.federated.round("t", sid)
        assert (document["round"], document["received"], document["version"]) == (2, 0, 1)
        _, records, cursor = await service.federated.history("t", sid, None, 10)
        assert cursor is None and len(records) == 1
        record = records[0]
        assert record["closed_by"] == "count" and record["total_weight"] == 100.0
        assert [p["client_id"] for p in record["participants"]] == ["c1", "c2", "c3"]
        norm = np.sqrt(sum(np.sum((client_params(1)[k] - START[k]) ** 2) for k in SHAPES))
        assert record["participants"][0]["update_norm"] == pytest.approx(norm, rel=1e-12)
        assert "fingerprint" not in record["participants"][0]


async def test_uniform_weighting_and_deltas() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2, weighting="uniform"), START)).id
        delta = {k: v - START[k] for k, v in client_params(2).items()}
        await service.federated.submit("t", sid, update(1, n=1000))
        request = UpdateRequest("c2", "delta", delta, num_examples=None, round=1)
        await service.federated.submit("t", sid, request)
        expected = average([(client_params(1), 1), (client_params(2), 1)])
        params = await held(service, sid)
        for name in SHAPES:
            np.testing.assert_allclose(params[name], expected[name], rtol=0, atol=1e-12)


async def test_late_early_and_duplicate_updates() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2), START)).id
        with pytest.raises(RoundNotOpen):
            await service.federated.submit("t", sid, update(1, round_=2))
        first = await service.federated.submit("t", sid, update(1))
        again = await service.federated.submit("t", sid, update(1))
        assert again.duplicate and not first.duplicate and again.received == 1
        assert (await service.federated.round("t", sid))["received"] == 1
        with pytest.raises(UpdateConflict):
            await service.federated.submit("t", sid, update(1, n=11))
        closing = await service.federated.submit("t", sid, update(2))
        assert closing.round_closed
        after = await held(service, sid)
        # The retry of the update that closed the round is answered, not refused.
        retry = await service.federated.submit("t", sid, update(2))
        assert retry.duplicate and retry.round_closed and retry.received == 2
        with pytest.raises(UpdateConflict):
            await service.federated.submit("t", sid, update(2, n=99))
        with pytest.raises(RoundClosed) as late:
            await service.federated.submit("t", sid, update(3))
        assert (late.value.round, late.value.current) == (1, 2)
        for name, values in (await held(service, sid)).items():
            np.testing.assert_array_equal(values, after[name])
        assert (await service.get("t", sid)).step == 1


async def test_a_round_closes_at_its_timeout_with_min_clients() -> None:
    aggregation = {"round_timeout_s": 0.3, "min_clients": 2}
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(5, **aggregation), START)).id
        await service.federated.submit("t", sid, update(1))
        await asyncio.sleep(0.45)
        # Past the deadline with one update: the round waits for the second.
        document = await service.federated.round("t", sid)
        assert document["status"] == "overdue" and document["round"] == 1
        reply = await service.federated.submit("t", sid, update(2, n=30))
        assert reply.round_closed
        _, records, _ = await service.federated.history("t", sid, None, 10)
        assert records[0]["closed_by"] == "timeout"
        # The next round has its own deadline; with two updates it closes on the timer.
        await service.federated.submit("t", sid, update(3, round_=2))
        await service.federated.submit("t", sid, update(4, round_=2))
        assert (await service.federated.round("t", sid))["round"] == 2
        started = time.monotonic()
        polled = await service.federated.params("t", sid, after=2, wait=5.0)
        assert polled is not None and polled.round == 3 and polled.version == 2
        assert time.monotonic() - started < 2.0
        _, records, _ = await service.federated.history("t", sid, None, 10)
        assert [r["closed_by"] for r in records] == ["timeout", "timeout"]
        assert [len(r["participants"]) for r in records] == [2, 2]


async def test_long_poll_waits_for_the_next_round_and_gives_up_after_wait() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2), START)).id
        now = await service.federated.params("t", sid, after=None, wait=0)
        assert now is not None and now.round == 1
        assert await service.federated.params("t", sid, after=1, wait=0.1) is None
        waiter = asyncio.create_task(service.federated.params("t", sid, after=1, wait=10))
        await asyncio.sleep(0.05)
        await service.federated.submit("t", sid, update(1))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await service.federated.submit("t", sid, update(2))
        got = await asyncio.wait_for(waiter, 5)
        assert got is not None and got.round == 2
        for name, values in (await held(service, sid)).items():
            np.testing.assert_array_equal(got.tensors[name], values)


async def test_async_updates_are_weighted_by_staleness_and_refused_when_too_old() -> None:
    staleness = {"policy": "polynomial", "alpha": 0.8, "a": 0.5, "max_staleness": 2}
    async with running(MemoryStore()) as service:
        sid = (
            await service.create("t", config({"mode": "async", "staleness": staleness}), START)
        ).id
        current = {k: v.copy() for k, v in START.items()}
        for version, base in [(0, 0), (1, 0), (2, 0), (3, 2)]:
            sent = client_params(10 + version, base)
            request = UpdateRequest(f"c{version}", "params", sent, base_version=base)
            reply = await service.federated.submit("t", sid, request)
            s = version - base
            weight = 0.8 * (1 + s) ** -0.5
            assert (reply.staleness, reply.version) == (s, version + 1)
            assert reply.weight == pytest.approx(weight, rel=1e-15)
            # FedAsync: x <- (1 - w) x + w x_new, with FedAvg's unit step.
            current = {k: current[k] + weight * (sent[k] - current[k]) for k in SHAPES}
            params = await held(service, sid)
            for name in SHAPES:
                np.testing.assert_allclose(params[name], current[name], rtol=0, atol=1e-12)
        duplicate = await service.federated.submit(
            "t", sid, UpdateRequest("c1", "params", client_params(11, 0), base_version=0)
        )
        assert duplicate.duplicate and duplicate.version == 2 and duplicate.staleness == 1
        with pytest.raises(UpdateConflict):
            await service.federated.submit(
                "t", sid, UpdateRequest("c1", "params", client_params(99, 0), base_version=0)
            )
        with pytest.raises(UpdateTooStale) as stale:
            await service.federated.submit(
                "t", sid, UpdateRequest("late", "params", client_params(5, 1), base_version=1)
            )
        assert (stale.value.version, stale.value.max_staleness) == (4, 2)
        with pytest.raises(InvalidInput, match="ahead"):
            await service.federated.submit(
                "t", sid, UpdateRequest("x", "params", client_params(5, 9), base_version=9)
            )
        with pytest.raises(InvalidInput, match="base_version"):
            await service.federated.submit("t", sid, UpdateRequest("x", "params", START, round=1))
        _, records, _ = await service.federated.history("t", sid, 2, 10)
        assert [r["version"] for r in records] == [3, 4]
        assert records[0]["staleness"] == 2


async def test_bad_updates_change_nothing() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2), START)).id
        bad = client_params(1)
        bad["w"][0, 0] = np.nan
        cases: list[UpdateRequest] = [
            UpdateRequest("c", "params", bad, num_examples=3, round=1),
            UpdateRequest("c", "params", {"w": START["w"]}, num_examples=3, round=1),
            UpdateRequest("c", "params", {**START, "b": np.zeros(3)}, num_examples=3, round=1),
            UpdateRequest("c", "params", START, num_examples=None, round=1),
            UpdateRequest("c", "params", START, num_examples=0, round=1),
            UpdateRequest("c", "params", START, num_examples=3, round=None),
            UpdateRequest("c", "params", START, num_examples=3, round=0),
            UpdateRequest("c", "grads", START, num_examples=3, round=1),
            UpdateRequest("c", "params", START, num_examples=3, round=1, base_version=0),
        ]
        for request in cases:
            with pytest.raises(InvalidInput):
                await service.federated.submit("t", sid, request)
        document = await service.federated.round("t", sid)
        assert document["received"] == 0 and document["clients"] == []


async def test_steps_and_federated_calls_are_kept_apart() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2), START)).id
        with pytest.raises(StepsNotAccepted):
            await service.step("t", sid, StepRequest(grads=dict(START)))
        plain = (await service.create("t", {**rounds_config(), "aggregation": None}, START)).id
        with pytest.raises(NotFederated):
            await service.federated.round("t", plain)
        with pytest.raises(NotFederated):
            await service.federated.submit("t", plain, update(1))
        info = await service.get("t", sid)
        assert info.document()["aggregation"]["clients_per_round"] == 2
        assert (await service.get("t", plain)).document()["aggregation"] is None


async def test_creation_checks_the_option_against_the_session() -> None:
    async with running(MemoryStore()) as service:
        with pytest.raises(ParamsRequired):
            await service.create("t", rounds_config(2), None)
        with pytest.raises(InvalidHyperparameter) as caught:
            await service.create("t", rounds_config(0), START)
        assert caught.value.argument == "aggregation.clients_per_round"
        plateau = {**rounds_config(2), "schedule": {"name": "ReduceLROnPlateau"}}
        with pytest.raises(InvalidHyperparameter) as caught:
            await service.create("t", plateau, START)
        assert caught.value.argument == "schedule.interval"
        lbfgs = rounds_config(2)
        lbfgs["optimizer"] = {"name": "LBFGS", "line_search_fn": "strong_wolfe"}
        with pytest.raises(InvalidHyperparameter):
            await service.create("t", lbfgs, START)
        assert (await service.list("t", 10, None))[0] == []


@pytest.mark.parametrize("snapshot_every", [1, 1000])
async def test_a_restart_mid_round_loses_no_accepted_update(
    store_factory: StoreFactory, snapshot_every: int
) -> None:
    aggregation_config = rounds_config(3, round_timeout_s=3600, min_clients=2)
    aggregation_config["optimizer"] = {"name": "FedAdam", "eta": 0.05}
    options: dict[str, Any] = {"snapshot_every": snapshot_every, "idempotency_window": 1}
    async with running(MemoryStore()) as steady:
        ref = (await steady.create("t", aggregation_config, START)).id
        for r, clients in ((1, (1, 2, 3)), (2, (4, 5, 6))):
            for c in clients:
                await steady.federated.submit("t", ref, update(c, round_=r, n=c))
        expected = await held(steady, ref)
    async with running(store_factory(), **options) as service:
        sid = (await service.create("t", aggregation_config, START)).id
        for c in (1, 2, 3, 4, 5):
            await service.federated.submit("t", sid, update(c, round_=1 if c < 4 else 2, n=c))
        before = await service.federated.round("t", sid)
        await settle(service)
    async with running(store_factory(), **options) as service:
        after = await service.federated.round("t", sid)
        assert after == {**before, "seconds_left": after["seconds_left"]}
        assert (after["round"], after["clients"]) == (2, ["c4", "c5"])
        # A retry of an update accepted before the restart is still a duplicate.
        assert (await service.federated.submit("t", sid, update(5, round_=2, n=5))).duplicate
        await service.federated.submit("t", sid, update(6, round_=2, n=6))
        params = await held(service, sid)
        for name in SHAPES:
            assert params[name].tobytes() == expected[name].tobytes()
        _, records, _ = await service.federated.history("t", sid, None, 10)
        assert [r["round"] for r in records] == [1, 2]


async def test_a_timeout_that_passed_while_down_closes_on_start(
    store_factory: StoreFactory,
) -> None:
    aggregation = rounds_config(3, round_timeout_s=0.2, min_clients=2)
    async with running(store_factory()) as service:
        sid = (await service.create("t", aggregation, START)).id
        await service.federated.submit("t", sid, update(1))
        await service.federated.stop()  # as if killed: no timer may close the round
        await service.federated.submit("t", sid, update(2))
    await asyncio.sleep(0.3)
    async with running(store_factory()) as service:
        polled = await service.federated.params("t", sid, after=1, wait=5)
        assert polled is not None and polled.round == 2
        _, records, _ = await service.federated.history("t", sid, None, 10)
        assert records[0]["closed_by"] == "timeout"


async def test_checkpoint_mid_round_restores_the_round() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2), START)).id
        await service.federated.submit("t", sid, update(1))
        arrays, metadata = await service.export_state("t", sid)
        copy = (await service.restore("t", arrays, metadata)).id
        for target in (sid, copy):
            await service.federated.submit("t", target, update(2))
        one, two = await held(service, sid), await held(service, copy)
        for name in SHAPES:
            assert one[name].tobytes() == two[name].tobytes()


async def test_deleting_a_session_answers_its_long_polls() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(2), START)).id
        waiter = asyncio.create_task(service.federated.params("t", sid, after=1, wait=10))
        await asyncio.sleep(0.05)
        await service.delete("t", sid)
        with pytest.raises(Exception, match="not found"):
            await asyncio.wait_for(waiter, 5)


@pytest.mark.parametrize("sid", ["fedadam", "fedyogi-float64", "fedavgm"])
async def test_presets_through_the_service_match_flower(sid: str) -> None:
    scenario: Scenario = SCENARIOS[sid]
    trace = load_trace(scenario)
    dtype = np.dtype(scenario.dtype)
    async with running(MemoryStore()) as service:
        async for got, expected in replay(service, scenario, trace):
            for name, values in expected.items():
                assert got[name].dtype == dtype
                tolerance = 1e-6 if dtype == np.float32 else 1e-12
                np.testing.assert_allclose(got[name], values, rtol=0, atol=tolerance)


async def test_an_update_the_step_would_refuse_is_refused_before_it_is_logged(
    store_factory: StoreFactory,
) -> None:
    # SOAP's first statistics of this delta overflow float32: apply_step refuses it, so the
    # update must be refused before its event is logged (a logged one would be refused on
    # every replay, leaving the session damaged).
    soap = {
        "optimizer": {"name": "SOAP", "lr": 0.01},
        "params": {"w": {"shape": [4, 4]}},
        "dtype": "float32",
        "nonfinite": "error",
        "aggregation": {"mode": "async"},
    }
    huge = UpdateRequest(
        client_id="c1", form="delta", tensors={"w": np.full((4, 4), 1e25, np.float32)}
    )
    async with running(store_factory()) as service:
        sid = (await service.create("t", soap, {"w": np.zeros((4, 4), np.float32)})).id
        with pytest.raises(InvalidInput, match="overflow SOAP's statistics"):
            await service.federated.submit("t", sid, dataclasses.replace(huge, base_version=0))
        info = await service.get("t", sid)
        assert info.step == 0 and info.damage is None
        fine = UpdateRequest(
            client_id="c1", form="delta", tensors={"w": np.ones((4, 4), np.float32)}, base_version=0
        )
        await service.federated.submit("t", sid, fine)
        assert (await service.get("t", sid)).step == 1
