"""Step metrics in every applied step's reply, and ``GET .../steps``, the step history.

Metrics are checked against torch: ``grad_norm`` is what ``clip_grad_norm_`` returns, the
update and parameter norms are those of torch's parameters before and after ``step()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import make_client, problem
from tests.api.training_loop import Model, post_step

TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}


def _norm(arrays: Any) -> float:
    return float(np.sqrt(sum(float((np.asarray(a, np.float64) ** 2).sum()) for a in arrays)))


@pytest.mark.parametrize(("dtype", "wire"), [("float32", "safetensors"), ("float64", "json")])
def test_metrics_of_every_step_match_torch(client: TestClient, dtype: str, wire: str) -> None:
    """A session that does not hold its params: the client sends them (param_norm)."""
    model = Model(dtype, seed=11)
    config = {
        "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        "params": {n: {"shape": s["shape"]} for n, s in model.initial().items()},
        "clip_grad_norm": {"max_norm": 1.0},
        "dtype": dtype,
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    params = list(model.params.values())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    tol = TOLERANCE[dtype]
    for _ in range(100):
        batch = model.batch()
        grads, loss = model.grads(batch)
        before = model.numpy()
        if wire == "json":
            body = {
                "grads": {n: g.tolist() for n, g in grads.items()},
                "params": {n: v.tolist() for n, v in before.items()},
                "loss": loss,
            }
            reply = client.post(f"/v1/sessions/{sid}/step", json=body).json()
        else:
            tensors = {**grads, **{f"params/{n}": v for n, v in before.items()}}
            response = client.post(
                f"/v1/sessions/{sid}/step",
                content=safetensors.encode(tensors, {"loss": repr(loss)}),
                headers={"Content-Type": "application/vnd.optserve.safetensors"},
            )
            reply = {"metrics": json.loads(safetensors.decode(response.content)[1]["metrics"])}
        model.loss(batch).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        after = model.numpy()
        metrics = reply["metrics"]
        assert set(metrics) == {"grad_norm", "update_norm", "param_norm", "loss"}
        np.testing.assert_allclose(metrics["grad_norm"], float(grad_norm), **tol)
        np.testing.assert_allclose(
            metrics["update_norm"], _norm(after[n] - before[n] for n in after), **tol
        )
        np.testing.assert_allclose(metrics["param_norm"], _norm(after.values()), **tol)
        assert metrics["loss"] == loss
        # The client follows torch's parameters; the session must agree with them.
        for p, value in zip(params, after.values(), strict=True):
            p.data = torch.from_numpy(value)
    history = client.get(f"/v1/sessions/{sid}/steps", params={"limit": 1000}).json()
    assert [r["step"] for r in history["steps"]] == list(range(1, 101))
    assert history["next"] is None
    assert history["steps"][-1]["metrics"] == metrics


def _session(client: TestClient, **extra: Any) -> str:
    config = {
        "optimizer": {"name": "Adam", "lr": 0.1},
        "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.5},
        "params": {"w": {"shape": [2], "data": [1.0, 2.0]}, "b": {"shape": [1], "data": [0.0]}},
        "param_groups": [{"params": ["b"], "lr": 0.01}],
        "dtype": "float64",
        "nonfinite": "skip",
        **extra,
    }
    response = client.post("/v1/sessions", json=config)
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


def _step(client: TestClient, sid: str, value: float, **body: Any) -> dict[str, Any]:
    g = {"w": [value, value], "b": [value]}
    return post_step(client, sid, {k: np.asarray(v) for k, v in g.items()}, "json", **body)


def test_history_pages_steps_applied_and_skipped(client: TestClient) -> None:
    sid = _session(client)
    for n in range(7):
        _step(client, sid, float("nan") if n == 3 else 0.5 + n)
    first = client.get(f"/v1/sessions/{sid}/steps", params={"limit": 4}).json()
    assert [r["seq"] for r in first["steps"]] == [1, 2, 3, 4] and first["next"] == 4
    rest = client.get(f"/v1/sessions/{sid}/steps", params={"after": 4, "limit": 4}).json()
    assert [r["seq"] for r in rest["steps"]] == [5, 6, 7] and rest["next"] is None
    records = first["steps"] + rest["steps"]
    assert [r["applied"] for r in records] == [True, True, True, False, True, True, True]
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5, 6]
    skipped = records[3]
    assert skipped["metrics"] is None and "NaN" in skipped["skipped"]
    # The lr each step used, per group: StepLR halves both groups every 2 steps.
    assert [r["lr"] for r in records if r["applied"]] == [
        [0.1, 0.01],
        [0.1, 0.01],
        [0.05, 0.005],
        [0.05, 0.005],
        [0.025, 0.0025],
        [0.025, 0.0025],
    ]
    assert all(r["time"].endswith("Z") for r in records)
    assert set(records[0]["metrics"]) == {"grad_norm", "update_norm", "param_norm"}


def test_history_keeps_the_newest_records_of_its_retention(tmp_path: Path) -> None:
    with make_client(step_history=5) as client:
        sid = _session(client)
        for n in range(12):
            _step(client, sid, 1.0 + n)
        records = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
        assert [r["step"] for r in records] == [8, 9, 10, 11, 12]


def test_history_survives_compaction_and_a_restart(tmp_path: Path) -> None:
    settings = {
        "storage": "disk",
        "data_dir": str(tmp_path),
        "snapshot_every": 2,
        "idempotency_window": 1,
    }
    with make_client(**settings) as client:
        sid = _session(client)
        for n in range(15):
            _step(client, sid, 1.0 + n, loss=float(n))
        before = client.get(f"/v1/sessions/{sid}/steps").json()
    assert len(before["steps"]) == 15
    with make_client(**settings) as client:
        after = client.get(f"/v1/sessions/{sid}/steps").json()
    assert after == before
    assert [r["metrics"]["loss"] for r in after["steps"]] == [float(n) for n in range(15)]


@pytest.mark.parametrize(("query", "field"), [({"limit": 0}, "limit"), ({"after": -1}, "after")])
def test_bad_history_queries_are_refused(
    client: TestClient, query: dict[str, int], field: str
) -> None:
    sid = _session(client)
    document = problem(client.get(f"/v1/sessions/{sid}/steps", params=query), 422)
    assert field in str(document["errors"])


def test_an_unknown_session_has_no_history(client: TestClient) -> None:
    problem(client.get("/v1/sessions/nope/steps"), 404)


def test_a_norm_that_overflows_is_written_inf(client: TestClient) -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 1e-40},
        "params": {"w": {"shape": [2], "data": [1.0, 2.0]}},
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    reply = client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": [1e30, 1e30]}})
    assert reply.status_code == 200, reply.text
    assert reply.json()["metrics"]["grad_norm"] == "inf"
    history = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
    assert history[0]["metrics"]["grad_norm"] == "inf"
