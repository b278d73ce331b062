"""Sessions whose param groups name their own optimizers, over HTTP.

Muon steps the 2-D weights and AdamW the rest. The reference is torch's Muon and AdamW
stepped together, each with its own scheduler of the session's schedule config (or the
committed golden fixture where torch is not importable): over both wires, in both dtypes,
with the server restarted on its data directory halfway through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, make_client, problem
from tests.core.cases import Case
from tests.core.cases.per_group import CASES, MUON_ADAMW
from tests.core.parity_inputs import make_inputs
from tests.core.test_parity import TOLERANCE, _reference

WIRES = ("json", "safetensors")
PARITY = {c.id: c for c in CASES}
RUNS = [
    (PARITY[f"per-group-muon-adamw-{schedule}-{dtype}"], wire)
    for schedule, dtype, wire in [
        ("onecycle", "float32", "json"),
        ("onecycle", "float64", "safetensors"),
        ("cosine", "float64", "json"),
        ("plateau", "float32", "safetensors"),
    ]
]


def _create(client: TestClient, config: dict[str, Any], initial: dict[str, np.ndarray]) -> str:
    params = {n: {"shape": list(v.shape), "data": v.ravel().tolist()} for n, v in initial.items()}
    response = client.post("/v1/sessions", json={**config, "params": params})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _step(
    client: TestClient, sid: str, grads: dict[str, np.ndarray], loss: float | None, wire: str
) -> None:
    if wire == "json":
        body: dict[str, Any] = {"grads": {n: g.ravel().tolist() for n, g in grads.items()}}
        if loss is not None:
            body["loss"] = loss
        response = client.post(f"/v1/sessions/{sid}/step", json=body)
    else:
        metadata = {"loss": repr(loss)} if loss is not None else None
        response = client.post(
            f"/v1/sessions/{sid}/step",
            content=safetensors.encode(grads, metadata),
            headers={"Content-Type": SAFETENSORS, "Accept": SAFETENSORS},
        )
    assert response.status_code == 200, response.text


def _held(client: TestClient, sid: str) -> dict[str, np.ndarray]:
    response = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS})
    assert response.status_code == 200, response.text
    tensors, _ = safetensors.decode(response.content)
    return {n: np.asarray(v) for n, v in tensors.items()}


@pytest.mark.parametrize(("case", "wire"), RUNS, ids=[f"{c.id}-{w}" for c, w in RUNS])
def test_muon_and_adamw_match_torch_across_a_restart(case: Case, wire: str, tmp_path: Path) -> None:
    inputs = make_inputs(case)
    needs_metric = case.metrics
    half = inputs.steps // 2
    with make_client(storage="disk", data_dir=tmp_path) as client:
        sid = _create(client, case.config, inputs.initial)
        for n in range(half):
            _step(client, sid, inputs.grads[n], inputs.losses[n] if needs_metric else None, wire)
        document = client.get(f"/v1/sessions/{sid}").json()
    with make_client(storage="disk", data_dir=tmp_path) as client:
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == document["step"] == half
        for n in range(half, inputs.steps):
            _step(client, sid, inputs.grads[n], inputs.losses[n] if needs_metric else None, wire)
        got = _held(client, sid)
    expected = _reference(case)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, **TOLERANCE[case.config["dtype"]])


def test_the_session_document_shows_each_groups_optimizer(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    shapes = {n: tuple(s["shape"]) for n, s in MUON_ADAMW["params"].items()}
    sid = _create(client, MUON_ADAMW, {n: rng.standard_normal(s) for n, s in shapes.items()})
    document = client.get(f"/v1/sessions/{sid}").json()
    assert [g["optimizer"] for g in document["param_groups"]] == ["AdamW", "Muon", "AdamW"]
    muon = document["param_groups"][1]
    assert muon["ns_steps"] == 4 and muon["nesterov"] is False and "betas" not in muon
    assert document["param_groups"][2]["betas"] == [0.85, 0.98]
    assert document["optimizer"]["name"] == "AdamW"


def test_a_checkpoint_restores_a_session_of_two_optimizers(client: TestClient) -> None:
    case = PARITY["per-group-muon-adamw-steplr-float64"]
    inputs = make_inputs(case)
    sid = _create(client, case.config, inputs.initial)
    for n in range(5):
        _step(client, sid, inputs.grads[n], None, "json")
    checkpoint = client.get(f"/v1/sessions/{sid}/state").content
    restored = client.post(
        "/v1/sessions", content=checkpoint, headers={"Content-Type": SAFETENSORS}
    )
    assert restored.status_code == 201, restored.text
    rid = restored.json()["id"]
    for n in range(5, 10):
        for session in (sid, rid):
            _step(client, session, inputs.grads[n], None, "safetensors")
    a, b = _held(client, sid), _held(client, rid)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("relabelled", ["SGD", "Adam"])
def test_a_checkpoint_whose_group_names_another_optimizer_is_refused(
    client: TestClient, relabelled: str
) -> None:
    """The Muon group's config says SGD (which keeps a momentum buffer too) or Adam; the
    state is Muon's. Restoring it would fail at the next step."""
    case = PARITY["per-group-muon-adamw-none-float64"]
    inputs = make_inputs(case)
    sid = _create(client, case.config, inputs.initial)
    _step(client, sid, inputs.grads[0], None, "json")
    tensors, metadata = safetensors.decode(client.get(f"/v1/sessions/{sid}/state").content)
    config = json.loads(metadata["session"])
    weights = config["param_groups"][0]["params"]
    config["param_groups"][0] = {"params": weights, "optimizer": {"name": relabelled}}
    forged = safetensors.encode(
        {n: np.asarray(v) for n, v in tensors.items()},
        {**metadata, "session": json.dumps(config)},
    )
    response = client.post("/v1/sessions", content=forged, headers={"Content-Type": SAFETENSORS})
    document = problem(response, 422)
    assert [e["field"] for e in document["errors"]] == ["state"]
    assert relabelled in document["detail"]
    assert [s["id"] for s in client.get("/v1/sessions").json()["sessions"]] == [sid]


def test_a_checkpoint_restores_values_its_schedule_moved_past_the_constructors_checks(
    client: TestClient,
) -> None:
    """The counterpart of the check above: CyclicLR cycles SGD's nesterov momentum down to
    0, which SGD's constructor refuses but its steps take, as in torch."""
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        "schedule": {
            "name": "CyclicLR",
            "base_lr": 0.01,
            "max_lr": 0.1,
            "step_size_up": 2,
            "base_momentum": 0.0,
            "max_momentum": 0.9,
        },
    }
    sid = _create(client, config, {"w": np.ones(2)})
    for _ in range(2):
        _step(client, sid, {"w": np.ones(2)}, None, "json")
    assert client.get(f"/v1/sessions/{sid}").json()["param_groups"][0]["momentum"] == 0.0
    checkpoint = client.get(f"/v1/sessions/{sid}/state").content
    restored = client.post(
        "/v1/sessions", content=checkpoint, headers={"Content-Type": SAFETENSORS}
    )
    assert restored.status_code == 201, restored.text


def _muon_on(names: list[str]) -> dict[str, Any]:
    return {
        "optimizer": {"name": "AdamW"},
        "params": {"w": {"shape": [3, 2]}, "b": {"shape": [2]}},
        "param_groups": [{"params": names, "optimizer": {"name": "Muon"}}],
    }


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        (_muon_on(["w", "b"]), "param_groups[0].params", "Muon only supports 2D parameters"),
        (
            {**_muon_on(["w"]), "param_groups": [{"params": ["w"], "optimizer": {"name": "x"}}]},
            "param_groups[0].optimizer.name",
            "x",
        ),
        (
            {
                **_muon_on(["w"]),
                "param_groups": [{"params": ["w"], "optimizer": {"name": "Muon", "lr": -2.0}}],
            },
            "param_groups[0].optimizer.lr",
            "Learning rate should be >= 0 but is: -2.0",
        ),
        (
            {
                **_muon_on(["w"]),
                "param_groups": [{"params": ["w"], "optimizer": {"name": "Muon"}, "amsgrad": True}],
            },
            "param_groups[0].amsgrad",
            "amsgrad",
        ),
    ],
)
def test_a_group_optimizer_that_cannot_take_the_group_is_refused(
    client: TestClient, config: dict[str, Any], field: str, words: str
) -> None:
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert [e["field"] for e in document["errors"]] == [field]
    assert words in document["detail"]
    assert client.get("/v1/sessions").json()["sessions"] == []


@pytest.mark.parametrize(
    ("session", "group", "named"),
    [
        ("AdamW", "AdamWScheduleFree", "AdamWScheduleFree"),
        ("SGDScheduleFree", "Muon", "SGDScheduleFree"),
        ("AdamW", "LBFGS", "LBFGS"),
    ],
)
def test_an_optimizer_that_steps_every_tensor_shares_no_session(
    client: TestClient, session: str, group: str, named: str
) -> None:
    config = {
        **_muon_on(["w"]),
        "optimizer": {"name": session},
        "param_groups": [{"params": ["w"], "optimizer": {"name": group}}],
    }
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert [e["field"] for e in document["errors"]] == ["param_groups[0].optimizer.name"]
    assert document["detail"].startswith(named)
    assert client.get("/v1/sessions").json()["sessions"] == []


def test_edits_follow_each_groups_optimizer_and_its_optimizer_stays(client: TestClient) -> None:
    case = PARITY["per-group-muon-adamw-none-float64"]
    inputs = make_inputs(case)
    sid = _create(client, case.config, inputs.initial)
    _step(client, sid, inputs.grads[0], None, "json")
    url = f"/v1/sessions/{sid}/param_groups/1"
    before = client.get(f"/v1/sessions/{sid}/state").content
    for body, field in [
        ({"optimizer": {"name": "AdamW"}}, "param_groups[1].optimizer"),
        ({"betas": [0.9, 0.95]}, "param_groups[1].betas"),
    ]:
        document = problem(client.patch(url, json=body), 422)
        assert [e["field"] for e in document["errors"]] == [field]
    assert client.get(f"/v1/sessions/{sid}/state").content == before
    edited = client.patch(url, json={"ns_steps": 3, "momentum": 0.8})
    assert edited.status_code == 200, edited.text
    assert edited.json()["param_groups"][1]["ns_steps"] == 3


def test_an_added_group_may_bring_its_own_optimizer(client: TestClient) -> None:
    case = PARITY["per-group-muon-adamw-none-float64"]
    inputs = make_inputs(case)
    sid = _create(client, case.config, inputs.initial)
    body = {
        "params": {"w3": {"shape": [2, 3], "data": [0.5] * 6}},
        "optimizer": {"name": "Muon", "lr": 0.05},
        "reason": "unfreeze",
    }
    added = client.post(f"/v1/sessions/{sid}/param_groups", json=body)
    assert added.status_code == 200, added.text
    group = added.json()["param_groups"][-1]
    assert group["optimizer"] == "Muon" and group["lr"] == 0.05
    vector = {"params": {"v": {"shape": [3], "data": [0.0] * 3}}, "optimizer": {"name": "Muon"}}
    document = problem(client.post(f"/v1/sessions/{sid}/param_groups", json=vector), 422)
    assert "Muon only supports 2D parameters" in document["detail"]


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"optimizer": {"name": "Muon"}}, "params", "Muon only supports 2D parameters"),
        ({"optimizer": {"name": "LBFGS"}}, "optimizer.name", "LBFGS"),
        ({"optimizer": {"name": "Muon", "lr": -1.0}}, "optimizer.lr", "-1.0"),
        ({"optimizer": "Muon"}, "optimizer", "optimizer must be an object"),
        ({"optimizer": {"name": "Muon"}, "betas": [0.9, 0.9]}, "betas", "unknown argument betas"),
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
    ],
)
def test_a_refused_added_group_names_the_fields_of_its_request(
    client: TestClient, options: dict[str, Any], field: str, words: str
) -> None:
    """The request has no ``param_groups``: its errors name its own keys, not those of
    the config entry it becomes (``param_groups[1]``, the session's group 2)."""
    case = PARITY["per-group-muon-adamw-none-float64"]
    inputs = make_inputs(case)
    sid = _create(client, case.config, inputs.initial)
    before = client.get(f"/v1/sessions/{sid}/state").content
    body = {"params": {"v": {"shape": [3], "data": [0.0] * 3}}, **options}
    document = problem(client.post(f"/v1/sessions/{sid}/param_groups", json=body), 422)
    assert [e["field"] for e in document["errors"]] == [field]
    assert words in document["detail"] and "param_groups[" not in document["detail"]
    assert client.get(f"/v1/sessions/{sid}/state").content == before


def test_preview_and_catalog_know_group_optimizers(client: TestClient) -> None:
    body = {
        "optimizer": MUON_ADAMW["optimizer"],
        "param_groups": MUON_ADAMW["param_groups"],
        "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.5},
        "steps": 3,
    }
    response = client.post("/v1/schedules/preview", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["optimizers"] == ["AdamW", "Muon", "AdamW"]
    assert response.json()["lr"][2] == [0.003 * 0.5, 0.02 * 0.5, 0.01 * 0.5]
    entries = {e["name"]: e for e in client.get("/v1/optimizers").json()["optimizers"]}
    assert entries["Muon"]["group_optimizer"] is True
    assert entries["LBFGS"]["group_optimizer"] is False


def test_a_safetensors_create_carries_group_optimizers_in_its_metadata(
    client: TestClient,
) -> None:
    case = PARITY["per-group-muon-adamw-none-float32"]
    inputs = make_inputs(case)
    metadata = {"session": json.dumps(case.config)}
    created = client.post(
        "/v1/sessions",
        content=safetensors.encode(inputs.initial, metadata),
        headers={"Content-Type": SAFETENSORS, "Accept": "application/json"},
    )
    assert created.status_code == 201, created.text
    assert [g["optimizer"] for g in created.json()["param_groups"]] == ["AdamW", "Muon", "AdamW"]
