"""Optimizers torch lacks, over HTTP: two groups against their packages, a checkpoint that
continues exactly, and Prodigy's refusal of unequal group lrs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SAFETENSORS, problem
from tests.core.reference_classes import available, reference_class

INITIAL = {"w": np.linspace(-1, 1, 16).reshape(4, 4), "b": np.array([0.5, -0.5, 0.25])}
"""A square matrix: SOAP's first bases are then unique (tests/core/cases/soap.py)."""
SECOND_GROUP: dict[str, dict[str, Any]] = {
    "Prodigy": {"d0": 1e-5, "eps": 1e-6},
    "CAME": {"lr": 2e-3, "betas": [0.5, 0.9, 0.99]},
    "SOAP": {"lr": 0.02, "shampoo_beta": 0.8},
}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "Prodigy": {"name": "Prodigy", "weight_decay": 0.01, "use_bias_correction": True},
    "CAME": {"name": "CAME", "lr": 1e-3, "weight_decay": 0.01},
    "SOAP": {"name": "SOAP", "lr": 0.01, "precondition_frequency": 3},
}
TOLERANCE = {"SOAP": {"rtol": 1e-5, "atol": 5e-7}}
"""SOAP's QR refresh runs in float32 in the package (tests/core/cases/soap.py)."""
STEPS = 25


def _grads(step: int) -> dict[str, list[Any]]:
    rng = np.random.default_rng(step)
    return {n: rng.standard_normal(v.shape).tolist() for n, v in INITIAL.items()}


def _config(optimizer: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    return {
        "optimizer": optimizer,
        "params": {n: {"shape": list(v.shape), "data": v.tolist()} for n, v in INITIAL.items()},
        "param_groups": [{"params": ["b"], **group}],
        "dtype": "float64",
    }


def _step(client: TestClient, sid: str, step: int) -> Any:
    return client.post(f"/v1/sessions/{sid}/step", json={"grads": _grads(step)})


def _params(client: TestClient, sid: str) -> dict[str, np.ndarray]:
    response = client.get(f"/v1/sessions/{sid}/params")
    return {n: np.array(v) for n, v in response.json()["params"].items()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_groups_over_http_match_the_package(client: TestClient, name: str) -> None:
    torch = pytest.importorskip("torch")
    if not available(name):
        pytest.skip("the reference package is not installed")
    optimizer, group = OPTIMIZERS[name], SECOND_GROUP[name]
    response = client.post("/v1/sessions", json=_config(optimizer, group))
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    tensors = {
        n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in INITIAL.items()
    }
    reference = reference_class(name)(
        [{"params": [tensors["w"]]}, {"params": [tensors["b"]], **group}],
        **{k: v for k, v in optimizer.items() if k != "name"},
    )
    for step in range(STEPS):
        assert _step(client, sid, step).status_code == 200
        for n, g in _grads(step).items():
            tensors[n].grad = torch.tensor(g, dtype=torch.float64)
        reference.step()
    tol = TOLERANCE.get(name, {"rtol": 1e-10, "atol": 1e-12})
    for n, value in _params(client, sid).items():
        np.testing.assert_allclose(value, tensors[n].detach().numpy(), **tol)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_checkpoint_continues_exactly(client: TestClient, name: str) -> None:
    sid = client.post("/v1/sessions", json=_config(OPTIMIZERS[name], SECOND_GROUP[name]))
    sid = sid.json()["id"]
    for step in range(4):
        _step(client, sid, step)
    state = client.get(f"/v1/sessions/{sid}/state")
    restored = client.post(
        "/v1/sessions", content=state.content, headers={"Content-Type": SAFETENSORS}
    )
    assert restored.status_code == 201, restored.text
    copy = restored.json()["id"]
    for step in range(4, 9):
        assert _step(client, sid, step).content == _step(client, copy, step).content


def test_prodigy_refuses_unequal_group_lrs_naming_the_group(client: TestClient) -> None:
    config = _config(OPTIMIZERS["Prodigy"], {"lr": 0.5})
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert document["errors"][0]["field"] == "param_groups[0].lr"  # the config's entry


def test_prodigy_refuses_a_step_after_an_edit_made_lrs_unequal(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json=_config(OPTIMIZERS["Prodigy"], {})).json()["id"]
    _step(client, sid, 0)
    before = _params(client, sid)
    edit = client.patch(f"/v1/sessions/{sid}/param_groups/1", json={"lr": 0.5})
    assert edit.status_code == 200, edit.text
    document = problem(_step(client, sid, 1), 422)
    assert document["errors"][0]["field"] == "param_groups[1].lr"
    after = _params(client, sid)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1
