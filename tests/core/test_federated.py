"""Core federated aggregation: the option, staleness weights, the round's running sum."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.federated import rounds
from service.core.federated.spec import HISTORY_LIMIT, AggregationSpec, parse_aggregation
from service.core.federated.staleness import staleness_weight

SHAPES = [(3, 2), (4,)]


def test_rounds_option_is_resolved_with_defaults() -> None:
    spec = parse_aggregation({"mode": "rounds", "clients_per_round": 5})
    assert spec is not None and spec.rounds
    assert spec.describe() == {
        "mode": "rounds",
        "clients_per_round": 5,
        "min_clients": 1,
        "round_timeout_s": None,
        "weighting": "num_examples",
        "aggregator": {"name": "FedAvg"},
        "privacy": None,
        "proximal_mu": 0.0,
    }
    assert parse_aggregation(spec.describe()) == spec
    assert parse_aggregation(None) is None


def test_async_option_is_resolved_with_defaults() -> None:
    spec = parse_aggregation({"mode": "async", "staleness": {"policy": "polynomial", "a": 2}})
    assert spec is not None and not spec.rounds
    assert spec.describe()["staleness"] == {
        "policy": "polynomial",
        "alpha": 1.0,
        "a": 2.0,
        "max_staleness": 10,
    }
    assert parse_aggregation(spec.describe()) == spec
    assert parse_aggregation({"mode": "async"}) == AggregationSpec(mode="async")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], "aggregation"),
        ({}, "aggregation.mode"),
        ({"mode": "sync"}, "aggregation.mode"),
        ({"mode": "rounds"}, "aggregation.clients_per_round"),
        ({"mode": "rounds", "clients_per_round": 0}, "aggregation.clients_per_round"),
        ({"mode": "rounds", "clients_per_round": 2, "min_clients": 3}, "aggregation.min_clients"),
        ({"mode": "rounds", "clients_per_round": 2, "min_clients": 0}, "aggregation.min_clients"),
        (
            {"mode": "rounds", "clients_per_round": 2, "round_timeout_s": 0},
            "aggregation.round_timeout_s",
        ),
        ({"mode": "rounds", "clients_per_round": 2, "weighting": "x"}, "aggregation.weighting"),
        ({"mode": "rounds", "clients_per_round": 2, "staleness": {}}, "aggregation.staleness"),
        ({"mode": "async", "clients_per_round": 2}, "aggregation.clients_per_round"),
        ({"mode": "async", "staleness": 3}, "aggregation.staleness"),
        ({"mode": "async", "staleness": {"alpha": 0}}, "aggregation.staleness.alpha"),
        ({"mode": "async", "staleness": {"alpha": 1.5}}, "aggregation.staleness.alpha"),
        ({"mode": "async", "staleness": {"a": -1}}, "aggregation.staleness.a"),
        ({"mode": "async", "staleness": {"policy": "hinge"}}, "aggregation.staleness.policy"),
        (
            {"mode": "async", "staleness": {"max_staleness": HISTORY_LIMIT + 1}},
            "aggregation.staleness.max_staleness",
        ),
    ],
)
def test_invalid_options_name_the_field(raw: Any, field: str) -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        parse_aggregation(raw)
    assert caught.value.argument == field


@pytest.mark.parametrize("staleness", [0, 1, 2, 7, 30])
def test_staleness_weights(staleness: int) -> None:
    constant = AggregationSpec(mode="async", policy="constant", alpha=0.6)
    polynomial = AggregationSpec(mode="async", policy="polynomial", alpha=0.6, a=0.5)
    assert staleness_weight(constant, staleness) == 0.6
    assert staleness_weight(polynomial, staleness) == pytest.approx(
        0.6 / np.sqrt(1 + staleness), rel=1e-15
    )
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(constant, -1)


def _clients(seed: int, n: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(n)]


def test_pseudo_gradient_is_current_minus_weighted_average() -> None:
    spec = AggregationSpec(mode="rounds", clients_per_round=3)
    current = _clients(0, 1)[0]
    clients = _clients(1, 3)
    weights = [10.0, 30.0, 5.0]
    federation = rounds.start(spec, SHAPES, 0, 0.0)
    opened = federation.round
    assert opened is not None
    for i, (params, weight) in enumerate(zip(clients, weights, strict=True)):
        delta = rounds.client_delta("params", params, current)
        norm = rounds.norm(delta)
        expected_norm = np.sqrt(
            sum(np.sum((p.astype(float) - c) ** 2) for p, c in zip(params, current, strict=True))
        )
        assert norm == pytest.approx(expected_norm, rel=1e-12)
        rounds.contribute(
            opened, rounds.Contribution(f"c{i}", int(weight), weight, norm, "", 0.0), delta
        )
    gradient = rounds.pseudo_gradient(opened.total, opened.weight, np.dtype(np.float32))
    for t, g in enumerate(gradient):
        average = np.average([c[t].astype(np.float64) for c in clients], axis=0, weights=weights)
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, current[t] - average, rtol=0, atol=2e-7)
    # Deltas sent as such aggregate to the same thing.
    again = rounds.start(spec, SHAPES, 0, 0.0).round
    assert again is not None
    for i, (params, weight) in enumerate(zip(clients, weights, strict=True)):
        delta = rounds.client_delta(
            "delta", [p - c for p, c in zip(params, current, strict=True)], current
        )
        rounds.contribute(again, rounds.Contribution(f"c{i}", 1, weight, 0.0, "", 0.0), delta)
    for a, b in zip(
        rounds.pseudo_gradient(again.total, again.weight, np.dtype(np.float32)),
        gradient,
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_with_update_previews_without_changing_the_round() -> None:
    spec = AggregationSpec(mode="rounds", clients_per_round=3)
    opened = rounds.start(spec, SHAPES, 0, 0.0).round
    assert opened is not None
    first, second = (
        rounds.client_delta("delta", c, [np.zeros(s) for s in SHAPES]) for c in _clients(2, 2)
    )
    rounds.contribute(opened, rounds.Contribution("a", 1, 2.0, 0.0, "", 0.0), first)
    before = [t.copy() for t in opened.total]
    totals, weight = rounds.with_update(opened, 3.0, second)
    assert weight == 5.0 and opened.weight == 2.0
    for t, b, s, total in zip(opened.total, before, second, totals, strict=True):
        np.testing.assert_array_equal(t, b)
        np.testing.assert_allclose(total, b + 3.0 * s)


def test_a_round_closes_by_count_or_by_timeout_with_enough_updates() -> None:
    spec = AggregationSpec(mode="rounds", clients_per_round=4, min_clients=2, round_timeout_s=10.0)
    opened = rounds.OpenRound(1, 0, 100.0, rounds.zeros_like(SHAPES))
    assert opened.deadline(spec) == 110.0
    assert opened.closes_by(spec, 105.0, 3) is None
    assert opened.closes_by(spec, 105.0, 4) == "count"
    assert opened.closes_by(spec, 110.0, 1) is None
    assert opened.closes_by(spec, 110.0, 2) == "timeout"
    untimed = AggregationSpec(mode="rounds", clients_per_round=4, min_clients=2)
    assert opened.deadline(untimed) is None and opened.closes_by(untimed, 1e12, 3) is None


def _federation_with_history() -> rounds.Federation:
    spec = AggregationSpec(mode="rounds", clients_per_round=3)
    federation = rounds.start(spec, SHAPES, 4, 12.5)
    opened = federation.round
    assert opened is not None
    for i, params in enumerate(_clients(3, 2)):
        delta = rounds.client_delta("delta", params, params)
        rounds.contribute(
            opened, rounds.Contribution(f"c{i}", 3 + i, 3.0 + i, 1.5, f"fp{i}", 13.0), delta
        )
    federation.remember(
        {"round": 0, "participants": [{"client_id": "x", "fingerprint": "f"}], "applied": True}
    )
    return federation


def test_flat_round_trip_through_json_and_bytes() -> None:
    federation = _federation_with_history()
    arrays, meta = rounds.to_flat(federation)
    copied = {
        k: np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape) for k, a in arrays.items()
    }
    back = rounds.from_flat(federation.spec, SHAPES, copied, json.loads(json.dumps(meta)))
    assert back.history == federation.history
    assert back.round is not None and federation.round is not None
    assert back.round.contributions == federation.round.contributions
    assert (back.round.number, back.round.version, back.round.opened_at, back.round.weight) == (
        1,
        4,
        12.5,
        7.0,
    )
    for a, b in zip(back.round.total, federation.round.total, strict=True):
        assert a.tobytes() == b.tobytes()
        assert a.flags.writeable


def _forged(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    spec = AggregationSpec(mode="rounds", clients_per_round=3)
    with pytest.raises(InvalidInput):
        rounds.from_flat(spec, SHAPES, arrays, meta)


def test_forged_state_is_refused() -> None:
    arrays, meta = rounds.to_flat(_federation_with_history())
    _forged(meta, {k: v.astype(np.float32) for k, v in arrays.items()})
    _forged(meta, {k: v for k, v in arrays.items() if not k.endswith("0")})
    bad = dict(arrays)
    bad["round/total.0"] = np.full(SHAPES[0], np.nan)
    _forged(meta, bad)
    _forged({**meta, "history": "none"}, arrays)
    _forged({**meta, "history": [{"round": "1", "participants": []}]}, arrays)
    _forged({**meta, "history": [{"round": 1, "participants": [{"client_id": 3}]}]}, arrays)
    contributions = meta["round"]["contributions"]
    _forged(
        {**meta, "round": {**meta["round"], "contributions": [*contributions, contributions[0]]}},
        arrays,
    )
    _forged({**meta, "round": {**meta["round"], "number": 0}}, arrays)
    _forged({**meta, "round": {**meta["round"], "weight": "heavy"}}, arrays)
    _forged({**meta, "round": None}, arrays)
    _forged({**meta, "round": {**meta["round"], "contributions": [{"client_id": "a"}]}}, arrays)
    with pytest.raises(InvalidInput):
        rounds.from_flat(AggregationSpec(mode="async"), SHAPES, arrays, meta)


def test_history_keeps_the_newest_records() -> None:
    federation = rounds.start(AggregationSpec(mode="async"), SHAPES, 0, 0.0)
    for version in range(HISTORY_LIMIT + 5):
        federation.remember({"version": version})
    assert len(federation.history) == HISTORY_LIMIT
    assert federation.history[0]["version"] == 5
