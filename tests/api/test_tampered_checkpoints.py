"""A checkpoint is client input: Prodigy's, CAME's and SOAP's scalars and every group's
hyperparameters in it are checked when it is restored (422, no session made), so that no
step can fail midway on a state that was accepted."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, problem

CONFIGS: dict[str, dict[str, Any]] = {
    "SOAP": {"name": "SOAP", "weight_decay": 0.0, "precondition_frequency": 2},
    "Prodigy": {"name": "Prodigy"},
    "CAME": {"name": "CAME", "lr": 1e-3},
}
GRADS = {"grads": {"w": np.ones((4, 4)).tolist(), "b": [1.0, 2.0, 3.0]}}

Edit = Callable[[dict[str, Any]], None]


def _set(path: tuple[str | int, ...], value: Any) -> Edit:
    def edit(state: dict[str, Any]) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


TAMPERED: list[tuple[str, Edit]] = [
    ("SOAP", _set(("optimizer_state", 0, "step"), -1)),
    ("SOAP", _set(("optimizer_state", 0, "step"), "x")),
    ("SOAP", _set(("optimizer_state", 0, "started"), [0, 0, 0])),
    ("SOAP", _set(("optimizer_state", 0, "precondition_frequency"), [0, 0])),
    ("SOAP", _set(("optimizer_state", 0, "shampoo_beta"), None)),
    ("SOAP", _set(("optimizer_state", 0, "data_format"), "channels_last")),
    ("SOAP", _set(("groups", 0, "max_precondition_dim"), "x")),
    ("SOAP", _set(("groups", 0, "max_precondition_dim"), 2)),
    ("SOAP", _set(("groups", 0, "merge_dims"), 1)),
    ("SOAP", _set(("groups", 0, "betas"), [0.5])),
    ("SOAP", _set(("groups", 0, "betas"), [0.9, 1.5])),
    ("Prodigy", _set(("optimizer_state", 0, "d"), None)),
    ("Prodigy", _set(("optimizer_state", 0, "d"), 0.0)),
    ("Prodigy", _set(("optimizer_state", 0, "k"), "x")),
    ("Prodigy", _set(("optimizer_state", 0, "started"), "x")),
    ("Prodigy", _set(("groups", 0, "slice_p"), 0)),
    ("Prodigy", _set(("groups", 0, "slice_p"), 1000000)),
    ("Prodigy", _set(("groups", 0, "d0"), 0)),
    ("Prodigy", _set(("groups", 0, "lr"), "x")),
    ("CAME", _set(("optimizer_state", 0, "step"), None)),
    ("CAME", _set(("groups", 0, "eps"), 0)),
    ("CAME", _set(("groups", 0, "betas"), [0.5])),
    ("CAME", _set(("groups", 0, "lr"), [0.5])),
]


def _checkpoint(client: TestClient, name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    config = {
        "optimizer": CONFIGS[name],
        "params": {
            "w": {"shape": [4, 4], "data": np.zeros((4, 4)).tolist()},
            "b": {"shape": [3], "data": [0.0] * 3},
        },
        "dtype": "float64",
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    for _ in range(3):
        assert client.post(f"/v1/sessions/{sid}/step", json=GRADS).status_code == 200
    return safetensors.decode(client.get(f"/v1/sessions/{sid}/state").content)


def _restore(client: TestClient, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> Any:
    body = safetensors.encode(arrays, metadata)
    return client.post("/v1/sessions", content=body, headers={"Content-Type": SAFETENSORS})


@pytest.mark.parametrize(("name", "edit"), TAMPERED)
def test_a_tampered_checkpoint_is_refused_and_makes_no_session(
    client: TestClient, name: str, edit: Edit
) -> None:
    arrays, metadata = _checkpoint(client, name)
    sessions = len(client.get("/v1/sessions").json()["sessions"])
    state = copy.deepcopy(json.loads(metadata["state"]))
    edit(state)
    response = _restore(client, arrays, {**metadata, "state": json.dumps(state)})
    problem(response, 422)
    assert len(client.get("/v1/sessions").json()["sessions"]) == sessions


@pytest.mark.parametrize("name", list(CONFIGS))
def test_an_untouched_checkpoint_still_restores_and_steps(client: TestClient, name: str) -> None:
    arrays, metadata = _checkpoint(client, name)
    restored = _restore(client, arrays, metadata)
    assert restored.status_code == 201, restored.text
    step = client.post(f"/v1/sessions/{restored.json()['id']}/step", json=GRADS)
    assert step.status_code == 200, step.text


@pytest.mark.parametrize(
    ("optimizer", "edit"),
    [
        ({"name": "Adam"}, {"amsgrad": True}),
        ({"name": "Prodigy"}, {"slice_p": 3}),
        ({"name": "SOAP", "weight_decay": 0.0}, {"max_precondition_dim": 2}),
    ],
)
def test_a_checkpoint_after_an_edit_that_made_the_state_again_restores(
    client: TestClient, optimizer: dict[str, Any], edit: dict[str, Any]
) -> None:
    """An edit before the first step makes the group's state with the edited values; its
    checkpoint is checked against those, not the config's."""
    config = {
        "optimizer": optimizer,
        "params": {"w": {"shape": [4, 4], "data": np.zeros((4, 4)).tolist()}},
        "dtype": "float64",
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    assert client.patch(f"/v1/sessions/{sid}/param_groups/0", json=edit).status_code == 200
    grads = {"grads": {"w": np.ones((4, 4)).tolist()}}
    for _ in range(2):
        assert client.post(f"/v1/sessions/{sid}/step", json=grads).status_code == 200
    exported = client.get(f"/v1/sessions/{sid}/state").content
    restored = client.post("/v1/sessions", content=exported, headers={"Content-Type": SAFETENSORS})
    assert restored.status_code == 201, restored.text
    copy_id = restored.json()["id"]
    original = client.post(f"/v1/sessions/{sid}/step", json=grads)
    assert client.post(f"/v1/sessions/{copy_id}/step", json=grads).content == original.content


def test_a_checkpoint_whose_schedule_took_betas_past_the_constructors_range_restores(
    client: TestClient,
) -> None:
    """OneCycleLR's max_momentum above 1 writes such betas[0], as torch lets it."""
    config = {
        "optimizer": {"name": "Adam"},
        "params": {"w": {"shape": [2], "data": [0.0, 0.0]}},
        "dtype": "float64",
        "schedule": {"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 20, "max_momentum": 1.5},
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    for _ in range(2):
        assert (
            client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": [1.0, 1.0]}}).status_code
            == 200
        )
    exported = client.get(f"/v1/sessions/{sid}/state").content
    restored = client.post("/v1/sessions", content=exported, headers={"Content-Type": SAFETENSORS})
    assert restored.status_code == 201, restored.text
