"""Robust and private federated sessions over HTTP: creation errors name the field, the
round document carries what clients need, and ``Idempotency-Key`` on updates."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import make_client, problem
from tests.api.test_federated import created, federated_config, json_update


def rounds(k: int = 3, **more: Any) -> dict[str, Any]:
    return {"mode": "rounds", "clients_per_round": k, "min_clients": k, **more}


@pytest.mark.parametrize(
    ("aggregation", "field"),
    [
        (
            rounds(4, aggregator={"name": "Krum", "num_malicious_clients": 1}),
            "num_malicious_clients",
        ),
        (rounds(aggregator={"name": "FedTrimmedAvg", "beta": 0.7}), "beta"),
        (rounds(aggregator={"name": "Average"}), "name"),
        (
            rounds(privacy={"clipping": "fixed", "noise_multiplier": 1.0, "clipping_norm": -1}),
            "clipping_norm",
        ),
        (rounds(privacy={"clipping": "adaptive", "noise_multiplier": 1.0}), "clipped_count_stddev"),
        (rounds(proximal_mu="large"), "proximal_mu"),
    ],
)
def test_bad_robust_options_are_422_naming_the_field(
    client: TestClient, aggregation: dict[str, Any], field: str
) -> None:
    before = client.get("/v1/sessions").json()
    response = client.post("/v1/sessions", json=federated_config(aggregation))
    document = problem(response, 422, "invalid-hyperparameter")
    assert document["errors"][0]["field"].endswith(field)
    assert client.get("/v1/sessions").json() == before


def test_the_round_document_carries_proximal_mu_and_privacy(client: TestClient) -> None:
    privacy = {"clipping": "fixed", "clipping_norm": 2.0, "noise_multiplier": 0.5, "seed": 1}
    aggregation = rounds(3, aggregator={"name": "FedMedian"}, privacy=privacy, proximal_mu=0.1)
    sid = created(client, federated_config(aggregation))
    document = client.get(f"/v1/sessions/{sid}/round").json()
    assert document["proximal_mu"] == 0.1 and document["clipping_norm"] == 2.0
    assert document["aggregation"]["aggregator"] == {"name": "FedMedian"}
    assert document["aggregation"]["privacy"] == privacy
    url = f"/v1/sessions/{sid}/updates"
    for n, client_id in enumerate("abc", start=1):
        assert client.post(url, json=json_update(client_id, n, round=1, num_examples=n)).is_success
    record = client.get(f"/v1/sessions/{sid}/rounds").json()["rounds"][0]
    assert record["privacy"]["clipping_norm"] == 2.0 and record["privacy"]["noise_stddev"] > 0


def test_a_retried_update_with_its_key_is_answered_again_and_counted_once(
    client: TestClient,
) -> None:
    sid = created(client, federated_config(rounds(2)))
    url = f"/v1/sessions/{sid}/updates"
    body = json_update("a", 1, round=1, num_examples=3)
    first = client.post(url, json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post(url, json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert {**again.json(), "duplicate": False} == first.json()
    assert client.get(f"/v1/sessions/{sid}/round").json()["received"] == 1
    other = json_update("a", 2, round=1, num_examples=3)
    reused = client.post(url, json=other, headers={"Idempotency-Key": "k-1"})
    problem(reused, 422, "idempotency-key-reused")
    elsewhere = client.post(
        url, json=json_update("b", 2, round=1, num_examples=1), headers={"Idempotency-Key": "k-1"}
    )
    problem(elsewhere, 422, "idempotency-key-reused")
    closing = client.post(
        url, json=json_update("b", 2, round=1, num_examples=1), headers={"Idempotency-Key": "k-2"}
    )
    assert closing.json()["round_closed"]
    # After the round closed, the retry still finds its answer, the key still its update.
    late = client.post(url, json=body, headers={"Idempotency-Key": "k-1"})
    assert late.status_code == 200 and late.json()["duplicate"]
    reused_late = client.post(
        url, json=json_update("c", 5, round=2, num_examples=1), headers={"Idempotency-Key": "k-2"}
    )
    problem(reused_late, 422, "idempotency-key-reused")
    history = client.get(f"/v1/sessions/{sid}/rounds").json()["rounds"][0]
    assert "idempotency_key" not in history["participants"][0]
    bad = client.post(url, json=body, headers={"Idempotency-Key": "bad key\x7f"})
    problem(bad, 400)


FIXED = {"clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 1.0, "seed": 1}
ADAPTIVE = {"clipping": "adaptive", "clipping_norm": 1.0, "noise_multiplier": 0.0, "seed": 1}


@pytest.mark.parametrize(
    ("privacy", "field"),
    [
        ({**FIXED, "noise_multiplier": "inf"}, "noise_multiplier"),
        ({**FIXED, "clipping_norm": "inf"}, "clipping_norm"),
        ({**FIXED, "noise_multiplier": 0.0, "clipping_norm": "inf"}, "clipping_norm"),
        # finite, but the noise's stddev (times a clipping norm) need not be
        ({**FIXED, "noise_multiplier": 1e300}, "noise_multiplier"),
        ({**FIXED, "clipping_norm": 1e300}, "clipping_norm"),
        ({**FIXED, "clipping_norm": 1e-320}, "clipping_norm"),
        ({**ADAPTIVE, "clip_norm_lr": "inf"}, "clip_norm_lr"),
        # z**-2 overflows when the aggregate's multiplier is computed
        ({**ADAPTIVE, "noise_multiplier": 1e-200}, "noise_multiplier"),
        (
            {**ADAPTIVE, "noise_multiplier": 1.0, "clipped_count_stddev": "inf"},
            "clipped_count_stddev",
        ),
    ],
)
def test_privacy_that_cannot_release_a_finite_round_is_refused(
    client: TestClient, privacy: dict[str, Any], field: str
) -> None:
    before = client.get("/v1/sessions").json()
    response = client.post("/v1/sessions", json=federated_config(rounds(privacy=privacy)))
    document = problem(response, 422, "invalid-hyperparameter")
    assert [e["field"] for e in document["errors"]] == [f"aggregation.privacy.{field}"]
    assert client.get("/v1/sessions").json() == before


def test_an_infinite_proximal_mu_is_refused(client: TestClient) -> None:
    response = client.post("/v1/sessions", json=federated_config(rounds(proximal_mu="inf")))
    document = problem(response, 422, "invalid-hyperparameter")
    assert [e["field"] for e in document["errors"]] == ["aggregation.proximal_mu"]


@pytest.mark.parametrize(("norm", "target"), [(100.0, 0.0), (1.0, 1.0)])
def test_an_extreme_adaptive_step_keeps_the_clipping_norm_positive_and_finite(
    tmp_path: Any, norm: float, target: float
) -> None:
    """clip_norm_lr large enough that the norm underflows to zero (every update unclipped
    by a norm of 100, none meant to be) or exp() overflows (every update clipped by a norm
    of 1, all meant to be unclipped); rounds keep closing, and the session keeps loading
    from its data directory."""
    privacy = {
        **ADAPTIVE,
        "clipping_norm": norm,
        "clip_norm_lr": 1e6,
        "target_unclipped_quantile": target,
    }
    with make_client(storage="disk", data_dir=tmp_path) as first:
        sid = created(first, federated_config(rounds(3, privacy=privacy)))
        for r in (1, 2):
            for n, client_id in enumerate("abc", start=1):
                body = json_update(client_id, n + 3 * r, round=r, num_examples=n)
                response = first.post(f"/v1/sessions/{sid}/updates", json=body)
                assert response.status_code == 200, response.text
        history = first.get(f"/v1/sessions/{sid}/rounds").json()["rounds"]
        norms = [h["privacy"]["next_clipping_norm"] for h in history]
        assert all(0.0 < c < float("inf") for c in norms), norms
        params = first.get(f"/v1/sessions/{sid}/params").json()
    with make_client(storage="disk", data_dir=tmp_path) as second:
        assert second.get(f"/v1/sessions/{sid}/params").json() == params
        assert second.get(f"/v1/sessions/{sid}/round").json()["round"] == 3
