"""Session resources: create (JSON, safetensors, checkpoint), list, read, delete, params,
state, manual schedule steps, and tenant isolation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, adam_config, auth, grads, problem, st_body, st_headers
from tests.api.reference import InProcess

Create = Callable[..., dict[str, Any]]


def test_create_answers_201_with_document_location_and_etag(client: TestClient) -> None:
    config = adam_config(labels={"run": "7"}, param_groups=[{"params": ["b"], "lr": 0.1}])
    response = client.post("/v1/sessions", json=config)
    assert response.status_code == 201, response.text
    document = response.json()
    assert response.headers["location"] == f"/v1/sessions/{document['id']}"
    assert response.headers["etag"] == '"0"'
    assert document["step"] == 0 and document["lr"] == [0.01, 0.1]
    assert document["optimizer"]["betas"] == [0.9, 0.999]  # defaults filled in
    assert document["tensors"] == {"w": {"shape": [2, 3]}, "b": {"shape": [3]}}
    assert document["labels"] == {"run": "7"} and document["holds_params"] is False
    assert client.get(response.headers["location"]).json() == document


def test_create_with_data_holds_params(client: TestClient) -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 0.5},
        "params": {
            "w": {"shape": [2, 2], "data": [[1, 2], [3, 4]]},
            "b": {"shape": [1], "data": [5]},
        },
        "dtype": "float64",
    }
    document = client.post("/v1/sessions", json=config).json()
    assert document["holds_params"] is True and document["dtype"] == "float64"
    params = client.get(f"/v1/sessions/{document['id']}/params").json()
    assert params == {"step": 0, "params": {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [5.0]}}


def test_data_for_some_tensors_only_is_refused(client: TestClient) -> None:
    config = adam_config()
    config["params"]["w"]["data"] = [0.0] * 6
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert document["errors"][0]["field"] == "params.b.data"


def test_create_from_safetensors_body(client: TestClient) -> None:
    initial = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    config = adam_config()
    body = st_body(initial, {"session": json.dumps(config)})
    response = client.post("/v1/sessions", content=body, headers={"Content-Type": SAFETENSORS})
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    sid = response.json()["id"]
    held = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS})
    tensors, metadata = safetensors.decode(held.content)
    assert metadata == {"step": "0"}
    np.testing.assert_array_equal(tensors["w"], initial["w"])


def test_safetensors_create_needs_a_config(client: TestClient) -> None:
    body = st_body({"w": np.ones(1, np.float32)})
    problem(client.post("/v1/sessions", content=body, headers={"Content-Type": SAFETENSORS}), 422)
    bad = st_body({"w": np.ones(1, np.float32)}, {"session": "{not json"})
    problem(client.post("/v1/sessions", content=bad, headers={"Content-Type": SAFETENSORS}), 400)


def test_invalid_hyperparameter_names_the_field(client: TestClient) -> None:
    config = adam_config(optimizer={"name": "Adam", "lr": 0.01, "betas": [0.9, 1.5]})
    document = problem(client.post("/v1/sessions", json=config), 422, "invalid-hyperparameter")
    assert document["errors"][0]["field"] == "optimizer.betas"
    unknown = adam_config(optimizer={"name": "Adamm"})
    assert problem(client.post("/v1/sessions", json=unknown), 422)["errors"][0]["field"] == (
        "optimizer.name"
    )


def test_list_is_paginated(client: TestClient, create: Create) -> None:
    ids = sorted(create()["id"] for _ in range(5))
    seen: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after is not None:
            params["after"] = after
        page = client.get("/v1/sessions", params=params).json()
        seen += [d["id"] for d in page["sessions"]]
        after = page["next"]
        if after is None:
            break
    assert seen == ids
    problem(client.get("/v1/sessions", params={"limit": 0}), 422)


def test_delete(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    response = client.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 204 and response.content == b""
    problem(client.get(f"/v1/sessions/{sid}"), 404, "session-not-found")
    problem(client.delete(f"/v1/sessions/{sid}"), 404)


def test_tenants_do_not_see_each_other(keyed: TestClient) -> None:
    alice, bob = auth("key-a"), auth("key-b")
    sid = keyed.post("/v1/sessions", json=adam_config(), headers=alice).json()["id"]
    assert keyed.get(f"/v1/sessions/{sid}", headers=alice).status_code == 200
    for method, path in [
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/params"),
        ("GET", "/state"),
        ("POST", "/schedule/step"),
    ]:
        response = keyed.request(method, f"/v1/sessions/{sid}{path}", headers=bob)
        problem(response, 404, "session-not-found")
    step = keyed.post(
        f"/v1/sessions/{sid}/step",
        json={"grads": {n: v.tolist() for n, v in grads().items()}},
        headers=bob,
    )
    problem(step, 404)
    assert keyed.get("/v1/sessions", headers=bob).json()["sessions"] == []
    assert [d["id"] for d in keyed.get("/v1/sessions", headers=alice).json()["sessions"]] == [sid]
    assert keyed.get(f"/v1/sessions/{sid}", headers=alice).json()["step"] == 0


def test_params_of_a_session_without_params_is_409(client: TestClient, create: Create) -> None:
    problem(client.get(f"/v1/sessions/{create()['id']}/params"), 409, "params-not-held")


def test_state_export_and_restore_continue_exactly(client: TestClient, create: Create) -> None:
    config = adam_config(
        optimizer={"name": "AdamW", "lr": 0.01, "amsgrad": True},
        schedule={"name": "CosineAnnealingLR", "T_max": 7},
    )
    config["params"] = {
        "w": {"shape": [2, 3], "data": np.linspace(-1, 1, 6).reshape(2, 3).tolist()},
        "b": {"shape": [3], "data": [0.5, -0.5, 0.0]},
    }
    sid = create(config)["id"]
    for seed in range(3):
        client.post(f"/v1/sessions/{sid}/step", content=st_body(grads(seed)), headers=st_headers())
    state = client.get(f"/v1/sessions/{sid}/state")
    assert state.status_code == 200 and state.headers["content-type"] == SAFETENSORS
    assert state.headers["etag"] == '"3"'
    restored = client.post(
        "/v1/sessions", content=state.content, headers={"Content-Type": SAFETENSORS}
    )
    assert restored.status_code == 201, restored.text
    copy = restored.json()
    assert (
        copy["id"] != sid
        and copy["step"] == 3
        and copy["lr"] == client.get(f"/v1/sessions/{sid}").json()["lr"]
    )
    for seed in range(3, 6):
        body = st_body(grads(seed))
        a = client.post(f"/v1/sessions/{sid}/step", content=body, headers=st_headers())
        b = client.post(f"/v1/sessions/{copy['id']}/step", content=body, headers=st_headers())
        assert a.content == b.content
    assert client.get(f"/v1/sessions/{sid}/state").content != state.content


def test_state_is_safetensors_only(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    problem(client.get(f"/v1/sessions/{sid}/state", headers={"Accept": "application/json"}), 406)
    ok = client.get(f"/v1/sessions/{sid}/state", headers={"Accept": "application/octet-stream"})
    assert ok.status_code == 200


def test_damaged_checkpoint_is_refused(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    tensors, metadata = safetensors.decode(client.get(f"/v1/sessions/{sid}/state").content)
    metadata["state"] = "{}"
    body = safetensors.encode(tensors, metadata)
    response = client.post("/v1/sessions", content=body, headers={"Content-Type": SAFETENSORS})
    problem(response, 422)


def test_manual_schedule_step(client: TestClient, create: Create) -> None:
    config = adam_config(
        optimizer={"name": "SGD", "lr": 1.0},
        schedule={"name": "StepLR", "step_size": 1, "gamma": 0.5, "interval": "manual"},
    )
    sid = create(config)["id"]
    g = {"grads": {n: v.tolist() for n, v in grads().items()}}
    assert client.post(f"/v1/sessions/{sid}/step", json=g).json()["lr"] == [1.0]
    response = client.post(f"/v1/sessions/{sid}/schedule/step")
    assert response.status_code == 200 and response.json()["lr"] == [0.5]
    assert response.headers["etag"] == '"1"'
    with_metric = client.post(f"/v1/sessions/{sid}/schedule/step", json={"metric": 1.0})
    assert with_metric.json()["lr"] == [0.25]
    problem(client.post(f"/v1/sessions/{sid}/schedule/step", json={"metric": "x"}), 422)
    problem(client.post(f"/v1/sessions/{sid}/schedule/step", json={"extra": 1}), 422)
    stepwise = create(adam_config(schedule={"name": "StepLR", "step_size": 1}))["id"]
    problem(client.post(f"/v1/sessions/{stepwise}/schedule/step"), 422)


def test_plateau_schedule_needs_its_metric(client: TestClient, create: Create) -> None:
    config = adam_config(schedule={"name": "ReduceLROnPlateau", "interval": "manual"})
    sid = create(config)["id"]
    problem(client.post(f"/v1/sessions/{sid}/schedule/step", json={}), 422)
    assert client.post(f"/v1/sessions/{sid}/schedule/step", json={"metric": 0.3}).status_code == 200


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_held_params_follow_the_deltas(client: TestClient, create: Create, dtype: str) -> None:
    np_dtype = np.dtype(dtype)
    initial = {"w": np.linspace(0, 1, 6).reshape(2, 3), "b": np.array([1.0, 2.0, 3.0])}
    config = adam_config(dtype=dtype, optimizer={"name": "AdamW", "lr": 0.1, "weight_decay": 0.1})
    config["params"] = {n: {"shape": list(v.shape), "data": v.tolist()} for n, v in initial.items()}
    sid = create(config)["id"]
    reference = InProcess(
        {**config, "params": {n: {"shape": list(v.shape)} for n, v in initial.items()}}, initial
    )
    for seed in range(4):
        g = grads(seed, np_dtype)
        client.post(f"/v1/sessions/{sid}/step", content=st_body(g), headers=st_headers())
        reference.step(g)
    held, _ = safetensors.decode(
        client.get(f"/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS}).content
    )
    assert reference.params is not None
    for spec, values in zip(reference.plan.tensors, reference.params, strict=True):
        assert held[spec.name].dtype == np_dtype
        np.testing.assert_array_equal(held[spec.name], values)


def test_every_unknown_hyperparameter_is_named_with_the_closest_known_one(
    client: TestClient,
) -> None:
    config = adam_config(optimizer={"name": "Adam", "lrr": 0.1, "betaz": [0.9, 0.99], "zzz": 1})
    document = problem(client.post("/v1/sessions", json=config), 422, "invalid-hyperparameter")
    errors = {error["field"]: error["message"] for error in document["errors"]}
    assert list(errors) == ["optimizer.lrr", "optimizer.betaz", "optimizer.zzz"]
    assert "did you mean lr?" in errors["optimizer.lrr"]
    assert "did you mean betas?" in errors["optimizer.betaz"]
    assert "did you mean" not in errors["optimizer.zzz"]
    assert "'" not in document["detail"]
    assert all(field in document["detail"] for field in errors)
    schedule = adam_config(schedule={"name": "StepLR", "step_sise": 3, "gama": 0.5})
    document = problem(client.post("/v1/sessions", json=schedule), 422, "invalid-hyperparameter")
    assert [e["field"] for e in document["errors"]] == ["schedule.step_sise", "schedule.gama"]
    assert "did you mean gamma?" in document["errors"][1]["message"]
    assert client.get("/v1/sessions").json()["sessions"] == []  # nothing was created


def test_a_trailing_slash_is_the_same_route(client: TestClient) -> None:
    created = client.post("/v1/sessions/", json=adam_config(), follow_redirects=False)
    assert created.status_code == 201
    session = created.json()["id"]
    listed = client.get("/v1/sessions/", follow_redirects=False)
    assert listed.status_code == 200
    assert [s["id"] for s in listed.json()["sessions"]] == [session]
    assert client.get(f"/v1/sessions/{session}/", follow_redirects=False).status_code == 200
