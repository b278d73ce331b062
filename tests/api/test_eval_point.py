"""``GET .../params?eval=true``: the point to evaluate the model at.

Schedule-free optimizers hold the training point ``y`` in the parameters and serve the
average ``x`` here, what the schedulefree package's ``eval()`` puts in the parameters;
every other optimizer evaluates where it steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import grads, problem

INITIAL = {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.array([0.5, -0.5, 0.25])}
STEPS = 30


def _session(client: TestClient, optimizer: dict[str, Any]) -> str:
    config = {
        "optimizer": optimizer,
        "params": {n: {"shape": list(v.shape), "data": v.tolist()} for n, v in INITIAL.items()},
        "param_groups": [{"params": ["b"], "lr": 0.02}],
        "dtype": "float64",
    }
    response = client.post("/v1/sessions", json=config)
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    for seed in range(STEPS):
        g = {n: v.tolist() for n, v in grads(seed, np.float64).items()}
        assert client.post(f"/v1/sessions/{sid}/step", json={"grads": g}).status_code == 200
    return sid


def _params(client: TestClient, sid: str, query: str = "") -> dict[str, np.ndarray]:
    response = client.get(f"/v1/sessions/{sid}/params{query}")
    assert response.status_code == 200, response.text
    return {n: np.array(v) for n, v in response.json()["params"].items()}


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_eval_point_is_the_packages_eval_and_params_stay_the_training_point(
    client: TestClient, name: str
) -> None:
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    sid = _session(client, {"name": name, "lr": 0.05, "weight_decay": 0.01})
    tensors = {
        n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in INITIAL.items()
    }
    reference = getattr(schedulefree, name)(
        [{"params": [tensors["w"]]}, {"params": [tensors["b"]], "lr": 0.02}],
        lr=0.05,
        weight_decay=0.01,
    )
    reference.train()
    for seed in range(STEPS):
        for n, g in grads(seed, np.float64).items():
            tensors[n].grad = torch.tensor(g)
        reference.step()
    training = {n: t.detach().numpy().copy() for n, t in tensors.items()}
    reference.eval()
    for n, got in _params(client, sid, "?eval=true").items():
        np.testing.assert_allclose(got, tensors[n].detach().numpy(), rtol=1e-10, atol=1e-12)
    for n, got in _params(client, sid).items():
        np.testing.assert_allclose(got, training[n], rtol=1e-10, atol=1e-12)


def test_schedule_free_eval_point_differs_from_the_params(client: TestClient) -> None:
    sid = _session(client, {"name": "AdamWScheduleFree", "lr": 0.05})
    x, y = _params(client, sid, "?eval=true"), _params(client, sid, "?eval=false")
    assert not np.allclose(x["w"], y["w"])
    # Reading the evaluation point changes nothing: steps still move y.
    np.testing.assert_array_equal(_params(client, sid)["w"], y["w"])


def test_other_optimizers_evaluate_where_they_step(client: TestClient) -> None:
    sid = _session(client, {"name": "Lion", "lr": 0.01})
    np.testing.assert_array_equal(
        _params(client, sid, "?eval=true")["w"], _params(client, sid)["w"]
    )


def test_a_malformed_eval_flag_is_a_422_problem(client: TestClient) -> None:
    sid = _session(client, {"name": "SGDScheduleFree", "lr": 0.05})
    before = _params(client, sid)
    problem(client.get(f"/v1/sessions/{sid}/params?eval=maybe"), 422)
    np.testing.assert_array_equal(_params(client, sid)["w"], before["w"])
