"""The federated endpoints over HTTP: rounds, long polls, updates in JSON and safetensors,
history, every federated problem type, tenancy; and a fuzz run against a federated
session so that no request reaches a 500."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.codec import safetensors
from service.config import Settings
from tests.api.conftest import SAFETENSORS, auth, problem, st_body, st_headers

START: dict[str, Any] = {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5]}


def federated_config(aggregation: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "optimizer": {"name": "FedAvg"},
        "params": {
            "w": {"shape": [2, 2], "data": START["w"]},
            "b": {"shape": [1], "data": START["b"]},
        },
        "dtype": "float64",
        "aggregation": aggregation or {"mode": "rounds", "clients_per_round": 2},
        **more,
    }


def created(client: TestClient, config: dict[str, Any], **headers: str) -> str:
    response = client.post("/v1/sessions", json=config, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["aggregation"]["mode"] == config["aggregation"]["mode"]
    session_id: str = response.json()["id"]
    return session_id


def new_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(v) + rng.standard_normal(np.shape(v)) for k, v in START.items()}


def json_update(client_id: str, seed: int, **fields: Any) -> dict[str, Any]:
    params = {k: v.tolist() for k, v in new_params(seed).items()}
    return {"client_id": client_id, "params": params, **fields}


def test_a_round_over_json(client: TestClient) -> None:
    sid = created(client, federated_config())
    document = client.get(f"/v1/sessions/{sid}/round").json()
    assert (document["mode"], document["round"], document["received"]) == ("rounds", 1, 0)
    fetched = client.get(f"/v1/sessions/{sid}/round/params")
    assert fetched.status_code == 200 and fetched.headers["etag"] == '"0"'
    assert fetched.json() == {"mode": "rounds", "round": 1, "version": 0, "params": START}
    body = json_update("a", 1, round=1, num_examples=3)
    first = client.post(f"/v1/sessions/{sid}/updates", json=body)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "mode": "rounds",
        "client_id": "a",
        "accepted": True,
        "duplicate": False,
        "version": 0,
        "round": 1,
        "received": 1,
        "round_closed": False,
    }
    again = client.post(f"/v1/sessions/{sid}/updates", json=body)
    assert again.json()["duplicate"] and again.headers["idempotent-replayed"] == "true"
    assert client.get(f"/v1/sessions/{sid}/round").json()["clients"] == ["a"]
    closing = client.post(
        f"/v1/sessions/{sid}/updates", json=json_update("b", 2, round=1, num_examples=1)
    )
    assert closing.json()["round_closed"] and closing.headers["etag"] == '"1"'
    after = client.get(f"/v1/sessions/{sid}/round/params", params={"after": 1}).json()
    assert (after["round"], after["version"]) == (2, 1)
    for name in START:
        expected = (3 * new_params(1)[name] + new_params(2)[name]) / 4
        np.testing.assert_allclose(after["params"][name], expected, rtol=0, atol=1e-12)
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1


def test_updates_and_params_over_safetensors(client: TestClient) -> None:
    sid = created(client, federated_config())
    params = new_params(3)
    deltas = {
        f"delta/{k}": (v - np.asarray(START[k])).astype(np.float32) for k, v in params.items()
    }
    meta = {"client_id": "st", "round": "1", "num_examples": "4"}
    response = client.post(
        f"/v1/sessions/{sid}/updates",
        content=st_body(deltas, meta),
        headers={"Content-Type": SAFETENSORS},
    )
    assert response.status_code == 200, response.text
    assert response.json()["received"] == 1
    mixed = {**deltas, "params/w": np.zeros((2, 2))}
    bad = client.post(
        f"/v1/sessions/{sid}/updates",
        content=st_body(mixed, {**meta, "client_id": "other"}),
        headers={"Content-Type": SAFETENSORS},
    )
    problem(bad, 422, "invalid-request")
    unprefixed = client.post(
        f"/v1/sessions/{sid}/updates",
        content=st_body({"w": np.zeros((2, 2))}, meta),
        headers={"Content-Type": SAFETENSORS},
    )
    problem(unprefixed, 422, "invalid-request")
    got = client.get(f"/v1/sessions/{sid}/round/params", headers=st_headers())
    assert got.headers["content-type"] == SAFETENSORS
    tensors, metadata = safetensors.decode(got.content)
    assert metadata == {"mode": "rounds", "round": "1", "version": "0"}
    np.testing.assert_array_equal(tensors["w"], np.asarray(START["w"]))


def test_long_poll_answers_204_when_nothing_new(client: TestClient) -> None:
    sid = created(client, federated_config())
    response = client.get(f"/v1/sessions/{sid}/round/params", params={"after": 1, "wait": 0.2})
    assert response.status_code == 204 and response.content == b""
    too_long = client.get(f"/v1/sessions/{sid}/round/params", params={"after": 1, "wait": 61})
    problem(too_long, 422, "invalid-request")


def test_federated_problem_documents(client: TestClient) -> None:
    sid = created(client, federated_config())
    url = f"/v1/sessions/{sid}/updates"
    early = problem(
        client.post(url, json=json_update("a", 1, round=2, num_examples=1)), 409, "round-not-open"
    )
    assert (early["round"], early["current_round"]) == (2, 1)
    client.post(url, json=json_update("a", 1, round=1, num_examples=1))
    conflict = problem(
        client.post(url, json=json_update("a", 9, round=1, num_examples=1)), 409, "update-conflict"
    )
    assert conflict["client_id"] == "a"
    client.post(url, json=json_update("b", 2, round=1, num_examples=1))
    late = problem(
        client.post(url, json=json_update("c", 3, round=1, num_examples=1)), 410, "round-closed"
    )
    assert late["current_round"] == 2
    step = client.post(
        f"/v1/sessions/{sid}/step", json={"grads": {"w": [[0, 0], [0, 0]], "b": [0]}}
    )
    problem(step, 409, "federated-session")
    missing = problem(client.post(url, json=json_update("d", 4, round=2)), 422, "invalid-input")
    assert missing["errors"][0]["field"] == "num_examples"
    both = json_update("e", 5, round=2, num_examples=1)
    both["delta"] = both["params"]
    problem(client.post(url, json=both), 422, "invalid-request")
    problem(
        client.post(url, json={**json_update("f", 6, round=2), "extra": 1}), 422, "invalid-request"
    )
    bad_id = problem(
        client.post(url, json=json_update("no spaces", 6, round=2, num_examples=1)), 422
    )
    assert bad_id["errors"][0]["field"] == "client_id"
    problem(client.post(url, json=json_update("g", 6, round=True, num_examples=1)), 422)
    plain = client.post(
        "/v1/sessions", json={"optimizer": {"name": "SGD"}, "params": {"w": {"shape": [1]}}}
    ).json()["id"]
    problem(client.get(f"/v1/sessions/{plain}/round"), 409, "not-federated")
    problem(client.get(f"/v1/sessions/{plain}/rounds"), 409, "not-federated")
    problem(client.get("/v1/sessions/nope/round"), 404, "session-not-found")


def test_async_updates_and_staleness_refusal(client: TestClient) -> None:
    aggregation = {
        "mode": "async",
        "staleness": {"policy": "polynomial", "a": 1.0, "max_staleness": 1},
    }
    sid = created(client, federated_config(aggregation))
    url = f"/v1/sessions/{sid}/updates"
    assert client.get(f"/v1/sessions/{sid}/round").json()["oldest_base_version"] == 0
    for seed in range(3):
        reply = client.post(url, json=json_update(f"c{seed}", seed, base_version=max(0, seed - 1)))
        assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["version"], body["staleness"], body["weight"]) == (3, 1, 0.5)
    stale = problem(
        client.post(url, json=json_update("old", 7, base_version=1)), 410, "update-too-stale"
    )
    assert (stale["version"], stale["max_staleness"]) == (3, 1)
    history = client.get(f"/v1/sessions/{sid}/rounds", params={"limit": 2}).json()
    assert history["mode"] == "async" and [r["version"] for r in history["rounds"]] == [1, 2]
    assert history["next"] == 2
    rest = client.get(f"/v1/sessions/{sid}/rounds", params={"after": history["next"]}).json()
    assert [r["version"] for r in rest["rounds"]] == [3] and rest["next"] is None
    assert rest["rounds"][0]["weight"] == 0.5 and "fingerprint" not in rest["rounds"][0]


def test_invalid_aggregation_is_refused_at_creation(client: TestClient) -> None:
    bad = federated_config({"mode": "rounds", "clients_per_round": 2, "min_clients": 5})
    document = problem(client.post("/v1/sessions", json=bad), 422, "invalid-hyperparameter")
    assert document["errors"][0]["field"] == "aggregation.min_clients"
    without_data = federated_config()
    without_data["params"] = {"w": {"shape": [2, 2]}}
    problem(client.post("/v1/sessions", json=without_data), 422, "params-required")


def test_another_tenants_session_is_not_found(keyed: TestClient) -> None:
    sid = created(keyed, federated_config(), **auth("key-a"))
    for path in ("round", "round/params", "rounds"):
        problem(keyed.get(f"/v1/sessions/{sid}/{path}", headers=auth("key-b")), 404)
    update = json_update("a", 1, round=1, num_examples=1)
    problem(keyed.post(f"/v1/sessions/{sid}/updates", json=update, headers=auth("key-b")), 404)
    problem(keyed.get(f"/v1/sessions/{sid}/round"), 401)


# -- fuzzing the federated routes on a federated session -----------------------------------

# safetensors bodies are bytes on the wire, like application/octet-stream.
schemathesis.serializer.alias(SAFETENSORS, "application/octet-stream")
fuzz_app = create_app(Settings(storage="memory", access_log=False, max_body_bytes=1 << 20))
schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _federated_session() -> str:
    choices: list[dict[str, Any]] = [{"mode": "rounds", "clients_per_round": 2}, {"mode": "async"}]
    aggregation = random.choice(choices)
    with asgi.get_client(fuzz_app) as client:
        response = client.post(
            f"http://{asgi.HOST}/v1/sessions", json=federated_config(aggregation)
        )
        assert response.status_code == 201, response.text
        session_id: str = response.json()["id"]
        return session_id


@pytest.mark.slow
@schema.include(path_regex=r"/(round|rounds|updates)").parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_federated_routes(case: schemathesis.Case) -> None:
    if case.path_parameters and random.random() < 0.8:
        case.path_parameters["session_id"] = _federated_session()
    wait = case.query.get("wait") if case.query else None
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0.05:
        case.query["wait"] = 0.05  # a valid long poll would only make the run slow
    case.call_and_validate(checks=CHECKS)
