"""Robust aggregators and central DP through the session service: Flower's numbers, noise
that survives a restart and a checkpoint, and what the rounds report."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter
from service.sessions.errors import IdempotencyKeyReused
from service.sessions.federated.models import UpdateRequest
from service.sessions.service import SessionService
from service.sessions.store import MemoryStore
from tests.core.flower_scenarios import SCENARIOS, load_trace
from tests.sessions.conftest import StoreFactory, running, settle
from tests.sessions.test_federated import (
    START,
    client_params,
    config,
    held,
    replay,
    rounds_config,
    update,
)

pytestmark = pytest.mark.anyio

NOISY = {
    "clipping": "adaptive",
    "noise_multiplier": 0.8,
    "clipped_count_stddev": 1.0,
    "clipping_norm": 0.5,
    "seed": 7,
}


def private_config(seed: int = 7) -> dict[str, Any]:
    out = rounds_config(
        5,
        min_clients=5,
        aggregator={"name": "Krum", "num_malicious_clients": 1},
        privacy={**NOISY, "seed": seed},
    )
    out["optimizer"] = {"name": "FedAdam", "eta": 0.05}
    return out


async def submit_rounds(service: SessionService, sid: str, rounds: range) -> None:
    for r in rounds:
        for c in range(1, 6):
            await service.federated.submit("t", sid, update(10 * r + c, round_=r, n=c))


async def run_steady(config: dict[str, Any]) -> dict[str, np.ndarray]:
    async with running(MemoryStore()) as steady:
        sid = (await steady.create("t", config, START)).id
        await submit_rounds(steady, sid, range(1, 4))
        return await held(steady, sid)


@pytest.mark.parametrize("snapshot_every", [1, 1000])
async def test_noise_is_the_same_across_a_restart(
    store_factory: StoreFactory, snapshot_every: int
) -> None:
    expected = await run_steady(private_config())
    options: dict[str, Any] = {"snapshot_every": snapshot_every}
    async with running(store_factory(), **options) as service:
        sid = (await service.create("t", private_config(), START)).id
        await submit_rounds(service, sid, range(1, 3))
        await service.federated.submit("t", sid, update(31, round_=3, n=1))
        await settle(service)
    async with running(store_factory(), **options) as service:
        for c in range(2, 6):
            await service.federated.submit("t", sid, update(30 + c, round_=3, n=c))
        params = await held(service, sid)
    for name, values in expected.items():
        assert params[name].tobytes() == values.tobytes()
    # The noise is there: another seed moves the params elsewhere.
    other = await run_steady(private_config(seed=8))
    assert max(float(np.max(np.abs(other[k] - expected[k]))) for k in expected) > 1e-6


async def test_a_checkpoint_continues_the_noise_exactly() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", private_config(), START)).id
        await submit_rounds(service, sid, range(1, 2))
        await service.federated.submit("t", sid, update(21, round_=2, n=1))
        arrays, metadata = await service.export_state("t", sid)
        copy = (await service.restore("t", arrays, metadata)).id
        for target in (sid, copy):
            for c in range(2, 6):
                await service.federated.submit("t", target, update(20 + c, round_=2, n=c))
            await submit_rounds(service, target, range(3, 4))
        one, two = await held(service, sid), await held(service, copy)
        for name in one:
            assert one[name].tobytes() == two[name].tobytes()


async def test_rounds_report_the_clipping_norm_and_who_was_kept() -> None:
    async with running(MemoryStore()) as service:
        config = private_config()
        config["aggregation"]["proximal_mu"] = 0.01
        sid = (await service.create("t", config, START)).id
        await submit_rounds(service, sid, range(1, 3))
        document = await service.federated.round("t", sid)
        assert document["proximal_mu"] == 0.01
        assert document["aggregation"]["privacy"] == {**NOISY, **_adaptive_defaults()}
        _, records, _ = await service.federated.history("t", sid, None, 10)
    first, second = records[0]["privacy"], records[1]["privacy"]
    assert first["clipping_norm"] == 0.5
    assert second["clipping_norm"] == first["next_clipping_norm"] != 0.5
    assert document["clipping_norm"] == second["next_clipping_norm"]
    assert first["noise_stddev"] > 0 and 0 <= first["clipped"] <= 5
    for record in records:
        assert len(record["kept"]) == 1
        assert record["kept"][0] in [p["client_id"] for p in record["participants"]]


def _adaptive_defaults() -> dict[str, Any]:
    return {"target_unclipped_quantile": 0.5, "clip_norm_lr": 0.2}


@pytest.mark.parametrize("sid", ["krum-fedadam", "dp-fixed-fedyogi", "bulyan", "dp-adaptive"])
async def test_robust_scenarios_through_the_service_match_flower(sid: str) -> None:
    scenario = SCENARIOS[sid]
    trace = load_trace(scenario)
    async with running(MemoryStore()) as service:
        async for got, expected in replay(service, scenario, trace):
            for name, values in expected.items():
                np.testing.assert_allclose(got[name], values, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("aggregation", "field"),
    [
        (
            {"min_clients": 4, "aggregator": {"name": "Krum", "num_malicious_clients": 1}},
            "aggregation.aggregator.num_malicious_clients",
        ),
        (
            {"min_clients": 5, "aggregator": {"name": "Bulyan", "num_malicious_clients": 1}},
            "aggregation.aggregator.num_malicious_clients",
        ),
        (
            {"min_clients": 2, "aggregator": {"name": "MultiKrum", "num_clients_to_keep": 3}},
            "aggregation.aggregator.num_clients_to_keep",
        ),
        ({"privacy": {"clipping": "fixed", "noise_multiplier": 1.0}}, "aggregation.privacy"),
    ],
)
async def test_creation_refuses_what_a_round_could_not_aggregate(
    aggregation: dict[str, Any], field: str
) -> None:
    async with running(MemoryStore()) as service:
        with pytest.raises(InvalidHyperparameter) as caught:
            await service.create("t", rounds_config(8, **aggregation), START)
        assert caught.value.argument.startswith(field)


async def test_idempotency_keys_survive_a_restart(store_factory: StoreFactory) -> None:
    async with running(store_factory()) as service:
        sid = (await service.create("t", rounds_config(3), START)).id
        keyed = dataclasses.replace(update(1), idempotency_key="k1")
        await service.federated.submit("t", sid, keyed)
        await settle(service)
    async with running(store_factory()) as service:
        assert (await service.federated.submit("t", sid, keyed)).duplicate
        with pytest.raises(IdempotencyKeyReused):
            await service.federated.submit(
                "t", sid, dataclasses.replace(update(2), idempotency_key="k1")
            )
        assert (await service.federated.round("t", sid))["received"] == 1


async def test_async_updates_take_idempotency_keys() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", config({"mode": "async"}), START)).id
        first = UpdateRequest("a", "params", client_params(1), base_version=0, idempotency_key="x")
        await service.federated.submit("t", sid, first)
        assert (await service.federated.submit("t", sid, first)).duplicate
        with pytest.raises(IdempotencyKeyReused):
            await service.federated.submit(
                "t", sid, dataclasses.replace(first, tensors=client_params(2))
            )
        assert (await service.get("t", sid)).step == 1


async def test_a_robust_round_closes_on_its_timer_with_the_updates_it_has() -> None:
    aggregation = {
        "round_timeout_s": 0.2,
        "min_clients": 3,
        "aggregator": {"name": "FedMedian"},
        "privacy": {"clipping": "fixed", "clipping_norm": 1e6, "noise_multiplier": 0.0},
    }
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", rounds_config(5, **aggregation), START)).id
        for c in (1, 2, 3):
            await service.federated.submit("t", sid, update(c))
        polled = await service.federated.params("t", sid, after=1, wait=5.0)
        assert polled is not None and polled.round == 2
        _, records, _ = await service.federated.history("t", sid, None, 10)
    assert records[0]["closed_by"] == "timeout" and records[0]["privacy"]["clipped"] == 0
    for name, values in polled.tensors.items():
        median = np.median([client_params(c)[name] for c in (1, 2, 3)], axis=0)
        np.testing.assert_allclose(values, median, rtol=0, atol=1e-12)
