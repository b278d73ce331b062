"""Robust aggregators and central DP in core: edge cases, the option's errors, flat form.

Flower's numbers on whole runs are in test_flower_parity.py; here the rules meet ties,
few clients and outliers, against independent computations (sorting, scipy).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter
from service.core.federated import aggregators, privacy, rounds
from service.core.federated.aggregators import AggregatorSpec
from service.core.federated.spec import HISTORY_LIMIT, parse_aggregation

SHAPES = [(3, 2), (4,)]


def updates(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(n)]


def test_median_of_an_even_count_with_ties_is_the_mean_of_the_middle_two() -> None:
    base = updates(6)
    base[1] = [a.copy() for a in base[0]]  # two clients sent the same update
    out, kept = aggregators.aggregate(AggregatorSpec("FedMedian"), base, [1.0] * 6)
    assert kept is None
    for i, got in enumerate(out):
        ordered = np.sort(np.stack([u[i] for u in base]), axis=0)
        np.testing.assert_array_equal(got, (ordered[2] + ordered[3]) / 2)


def test_median_ignores_weights_and_outliers() -> None:
    base = updates(5)
    base[4] = [a * 1e6 for a in base[4]]
    out, _ = aggregators.aggregate(AggregatorSpec("FedMedian"), base, [1, 1, 1, 1, 1e9])
    clean, _ = aggregators.aggregate(AggregatorSpec("FedMedian"), base, [1.0] * 5)
    for a, b in zip(out, clean, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.max(np.abs(a)) < 10


@pytest.mark.parametrize(("n", "beta"), [(3, 0.2), (5, 0.2), (8, 0.25), (9, 0.49), (4, 0.0)])
def test_trimmed_mean_is_scipys(n: int, beta: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    base = updates(n, seed=n)
    out, _ = aggregators.aggregate(AggregatorSpec("FedTrimmedAvg", beta=beta), base, [1.0] * n)
    for i, got in enumerate(out):
        expected = stats.trim_mean(np.stack([u[i] for u in base]), beta, axis=0)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


def test_trimming_with_fewer_clients_than_a_cut_is_the_plain_mean() -> None:
    base = updates(4)
    out, _ = aggregators.aggregate(AggregatorSpec("FedTrimmedAvg", beta=0.2), base, [1.0] * 4)
    for i, got in enumerate(out):
        np.testing.assert_allclose(got, np.mean([u[i] for u in base], axis=0), atol=1e-15)


def test_krum_keeps_an_honest_update_and_multikrum_averages_the_best() -> None:
    honest = updates(5, seed=3)
    attackers = [[a * 0 + 50.0 for a in honest[0]] for _ in range(2)]
    everyone = honest + attackers
    weights = [float(w) for w in range(1, 8)]
    _, kept = aggregators.aggregate(
        AggregatorSpec("Krum", num_malicious_clients=2), everyone, weights
    )
    assert kept is not None and len(kept) == 1 and kept[0] < 5
    spec = AggregatorSpec("MultiKrum", num_malicious_clients=2, num_clients_to_keep=3)
    out, kept = aggregators.aggregate(spec, everyone, weights)
    assert kept is not None and sorted(kept) == sorted(set(kept)) and max(kept) < 5
    total = sum(weights[i] for i in kept)
    for i, got in enumerate(out):
        expected = sum(weights[j] * everyone[j][i] for j in kept) / total
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)


def test_krum_breaks_ties_by_arrival_order() -> None:
    same = [[np.ones(s) for s in SHAPES] for _ in range(4)]
    _, kept = aggregators.aggregate(AggregatorSpec("Krum"), same, [1.0] * 4)
    assert kept == [0]


def test_bulyan_rejects_attackers_coordinate_wise() -> None:
    honest = updates(6, seed=4)
    attacker = [[a + 1e3 for a in honest[0]]]
    out, kept = aggregators.aggregate(
        AggregatorSpec("Bulyan", num_malicious_clients=1), honest + attacker, [1.0] * 7
    )
    assert kept is not None and len(kept) == 5 and 6 not in kept
    for i, got in enumerate(out):
        stacked = np.stack([honest[j][i] for j in range(6)])
        assert np.all(got >= stacked.min(axis=0)) and np.all(got <= stacked.max(axis=0))


def _field(aggregation: dict[str, Any]) -> str:
    with pytest.raises(InvalidHyperparameter) as caught:
        parse_aggregation({"mode": "rounds", "clients_per_round": 10, **aggregation})
    return caught.value.argument


@pytest.mark.parametrize(
    ("aggregation", "field"),
    [
        ({"aggregator": {"name": "Mean"}}, "aggregation.aggregator.name"),
        ({"aggregator": "FedMedian"}, "aggregation.aggregator"),
        ({"aggregator": {"name": "FedTrimmedAvg", "beta": 0.5}}, "aggregation.aggregator.beta"),
        ({"aggregator": {"name": "FedMedian", "beta": 0.1}}, "aggregation.aggregator.beta"),
        (
            {"aggregator": {"name": "Krum", "num_malicious_clients": -1}},
            "aggregation.aggregator.num_malicious_clients",
        ),
        (
            {"min_clients": 6, "aggregator": {"name": "Bulyan", "num_malicious_clients": 1}},
            "aggregation.aggregator.num_malicious_clients",
        ),
        (
            {"min_clients": 3, "aggregator": {"name": "MultiKrum", "num_clients_to_keep": 4}},
            "aggregation.aggregator.num_clients_to_keep",
        ),
        ({"privacy": {"clipping": "none"}}, "aggregation.privacy.clipping"),
        ({"privacy": {"clipping": "fixed", "clipping_norm": 1.0}}, "aggregation.privacy"),
        (
            {"privacy": {"clipping": "fixed", "clipping_norm": 0.0, "noise_multiplier": 1.0}},
            "aggregation.privacy.clipping_norm",
        ),
        (
            {"privacy": {"clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": -1}},
            "aggregation.privacy.noise_multiplier",
        ),
        (
            {
                "privacy": {
                    "clipping": "fixed",
                    "clipping_norm": 1,
                    "noise_multiplier": 1,
                    "clip_norm_lr": 1,
                }
            },
            "aggregation.privacy.clip_norm_lr",
        ),
        (
            {"privacy": {"clipping": "adaptive", "noise_multiplier": 1.0}},
            "aggregation.privacy.clipped_count_stddev",
        ),
        (
            {"privacy": {"clipping": "adaptive", "noise_multiplier": 0, "clip_norm_lr": 0}},
            "aggregation.privacy.clip_norm_lr",
        ),
        (
            {"privacy": {"clipping": "adaptive", "noise_multiplier": 0, "seed": -1}},
            "aggregation.privacy.seed",
        ),
        ({"proximal_mu": -0.1}, "aggregation.proximal_mu"),
    ],
)
def test_bad_options_name_the_field(aggregation: dict[str, Any], field: str) -> None:
    assert _field(aggregation).startswith(field)


def test_async_sessions_take_no_aggregator() -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        parse_aggregation({"mode": "async", "aggregator": {"name": "FedMedian"}})
    assert caught.value.argument == "aggregation.aggregator"


def test_adaptive_noise_spends_part_of_the_budget_on_the_count() -> None:
    spec = parse_aggregation(
        {
            "mode": "rounds",
            "clients_per_round": 40,
            "privacy": {"clipping": "adaptive", "noise_multiplier": 1.0},
        }
    )
    assert spec is not None and spec.privacy is not None
    assert spec.privacy.clipped_count_stddev == 2.0  # clients_per_round / 20
    z = spec.privacy.aggregate_noise_multiplier
    assert z**-2 == pytest.approx(1.0 - (2 * 2.0) ** -2)


def test_noise_is_seeded_and_recorded() -> None:
    spec = privacy.parse_privacy(
        {"clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 2.0, "seed": 3}, 4
    )
    assert spec is not None
    start = privacy.start(spec)
    aggregate = [np.zeros(s) for s in SHAPES]
    one = privacy.release(spec, start, aggregate, clipped=1, n=4)
    two = privacy.release(spec, start, aggregate, clipped=1, n=4)
    assert one.record == two.record == {"clipping_norm": 1.0, "clipped": 1, "noise_stddev": 0.5}
    for a, b in zip(one.aggregate, two.aggregate, strict=True):
        np.testing.assert_array_equal(a, b)
    # The noise has the configured scale, and the state moved on.
    drawn = np.concatenate([a.ravel() for a in one.aggregate])
    assert 0 < np.std(drawn) < 2
    assert one.state.generator != start.generator and start.rounds == 0 < one.state.rounds
    later = privacy.release(spec, one.state, aggregate, clipped=0, n=4)
    assert not np.array_equal(later.aggregate[0], one.aggregate[0])


def test_a_private_robust_round_survives_its_flat_form() -> None:
    raw = {
        "mode": "rounds",
        "clients_per_round": 5,
        "aggregator": {"name": "FedMedian"},
        "privacy": {"clipping": "adaptive", "noise_multiplier": 0.2, "seed": 11},
    }
    spec = parse_aggregation(raw)
    assert spec is not None
    federation = rounds.start(spec, SHAPES, 0, 0.0)
    opened = federation.round
    assert opened is not None
    for j, update in enumerate(updates(3)):
        contribution = rounds.Contribution(f"c{j}", 1, 1.0, rounds.norm(update), "fp", 0.0)
        rounds.contribute(opened, contribution, [u.copy() for u in update])
    arrays, meta = rounds.to_flat(federation)
    assert sum(name.startswith(rounds.UPDATE_PREFIX) for name in arrays) == 3 * len(SHAPES)
    copy = rounds.from_flat(spec, SHAPES, arrays, json.loads(json.dumps(meta)))
    dtype = np.dtype(np.float64)
    mine, theirs = rounds.closing(federation, dtype), rounds.closing(copy, dtype)
    assert mine.record == theirs.record and mine.privacy == theirs.privacy
    for a, b in zip(mine.gradient, theirs.gradient, strict=True):
        np.testing.assert_array_equal(a, b)
    # A checkpoint missing a kept update, or its privacy state, is refused.
    with pytest.raises(Exception, match="arrays do not match"):
        rounds.from_flat(spec, SHAPES, {k: v for k, v in arrays.items() if k[-3:] != "2.1"}, meta)
    with pytest.raises(Exception, match="privacy"):
        rounds.from_flat(spec, SHAPES, arrays, {**meta, "privacy": {"clipping_norm": -1}})


def test_the_history_finds_keyed_updates_until_it_forgets_their_round() -> None:
    spec = parse_aggregation({"mode": "rounds", "clients_per_round": 2})
    assert spec is not None
    federation = rounds.start(spec, [(1,)], 0, 0.0)

    def record(number: int) -> dict[str, Any]:
        participants = [
            {"client_id": f"c{k}", "fingerprint": f"fp{number}.{k}", "idempotency_key": key}
            for k, key in enumerate([f"k{number}", None])
        ]
        return {"round": number, "participants": participants}

    federation.remember(record(1))
    found = federation.keyed("k1")  # built from the history at the first look-up
    assert found == rounds.KeyedUpdate("c0", 1, "fp1.0")
    for number in range(2, HISTORY_LIMIT + 2):
        federation.remember(record(number))  # kept up to date from then on
    assert federation.keyed("k1") is None  # round 1 left the history
    assert federation.keyed("k2") == rounds.KeyedUpdate("c0", 2, "fp2.0")
    last = HISTORY_LIMIT + 1
    assert federation.keyed(f"k{last}") == rounds.KeyedUpdate("c0", last, f"fp{last}.0")
    rebuilt = rounds.Federation(spec, federation.round, list(federation.history))
    for number in (1, 2, last):
        assert rebuilt.keyed(f"k{number}") == federation.keyed(f"k{number}")
