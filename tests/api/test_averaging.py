"""Averaged weights (``averaging``) against ``torch.optim.swa_utils.AveragedModel``, and
``SWALR`` against torch's, alone and in SequentialLR.

The torch loop: ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d))`` (or the
default equal average), ``update_parameters(model)`` after each step (SWA: from step
``start``, every ``every`` steps); the session holds the params and serves the average with
``GET .../params?average=true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, make_client, problem
from tests.api.training_loop import Model, held_params, post_step

TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}


class Net(torch.nn.Module):
    def __init__(self, model: Model) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(model.params["w"].detach().clone())
        self.b = torch.nn.Parameter(model.params["b"].detach().clone())


def averaged(client: TestClient, sid: str, wire: str = "safetensors") -> dict[str, np.ndarray]:
    if wire == "json":
        document = client.get(f"/v1/sessions/{sid}/params", params={"average": "true"}).json()
        return {n: np.asarray(v) for n, v in document["params"].items()}
    response = client.get(
        f"/v1/sessions/{sid}/params", params={"average": "true"}, headers={"Accept": SAFETENSORS}
    )
    assert response.status_code == 200, response.text
    tensors, _ = safetensors.decode(response.content)
    return {n: np.asarray(v) for n, v in tensors.items()}


def run_against_torch(
    client: TestClient,
    dtype: str,
    wire: str,
    averaging: dict[str, Any],
    schedule: dict[str, Any] | None,
    steps: int = 120,
) -> None:
    model = Model(dtype, seed=21)
    net = Net(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if averaging["kind"] == "ema":
        avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(averaging["decay"]))
    else:
        avg = AveragedModel(net)
    sched: Any = None
    if schedule is not None and schedule["name"] == "SWALR":
        sched = SWALR(opt, swa_lr=0.01, anneal_epochs=7, anneal_strategy="linear")
    elif schedule is not None:
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
        swalr = SWALR(opt, swa_lr=0.005, anneal_epochs=5)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [cosine, swalr], milestones=[30])
    config = {
        "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        "params": model.initial(),
        "dtype": dtype,
        "averaging": averaging,
        "schedule": schedule,
    }
    created = client.post("/v1/sessions", json=config)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert created.json()["averaging"] == averaging
    start, every = averaging.get("start", 0), averaging.get("every", 1)
    tol = TOLERANCE[dtype]
    for step in range(1, steps + 1):
        x, y = model.batch()
        loss = ((x @ net.w + net.b - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        grads = {"w": net.w.grad.numpy().copy(), "b": net.b.grad.numpy().copy()}  # type: ignore[union-attr]
        reply = post_step(client, sid, grads, wire)
        opt.step()
        if averaging["kind"] == "ema" or (step >= start and (step - start) % every == 0):
            avg.update_parameters(net)
        if sched is not None:
            sched.step()
        assert reply["lr"] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12)
        if step % 10 == 0 or step == steps:
            got = averaged(client, sid, wire)
            for name, value in got.items():
                want = getattr(avg.module, name).detach().numpy()
                np.testing.assert_allclose(value, want, **tol, err_msg=f"{name} at {step}")
            for name, value in held_params(client, sid).items():
                want = getattr(net, name).detach().numpy()
                np.testing.assert_allclose(value, want, **tol, err_msg=name)


SWALR_ALONE = {"name": "SWALR", "swa_lr": 0.01, "anneal_epochs": 7, "anneal_strategy": "linear"}
SWALR_AFTER_COSINE = {
    "name": "SequentialLR",
    "schedulers": [
        {"name": "CosineAnnealingLR", "T_max": 40},
        {"name": "SWALR", "swa_lr": 0.005, "anneal_epochs": 5},
    ],
    "milestones": [30],
}


@pytest.mark.parametrize(
    ("dtype", "wire", "averaging", "schedule"),
    [
        ("float32", "json", {"kind": "ema", "decay": 0.9}, None),
        ("float64", "safetensors", {"kind": "ema", "decay": 0.95}, SWALR_ALONE),
        ("float32", "safetensors", {"kind": "swa", "start": 30, "every": 3}, SWALR_AFTER_COSINE),
        ("float64", "json", {"kind": "swa", "start": 10, "every": 1}, None),
    ],
)
def test_averaged_weights_match_averaged_model(
    client: TestClient,
    dtype: str,
    wire: str,
    averaging: dict[str, Any],
    schedule: dict[str, Any] | None,
) -> None:
    run_against_torch(client, dtype, wire, averaging, schedule)


def test_before_its_first_update_the_average_is_the_initial_params(client: TestClient) -> None:
    model = Model("float64")
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1},
        "params": model.initial(),
        "dtype": "float64",
        "averaging": {"kind": "swa", "start": 5},
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    grads, _ = model.grads(model.batch())
    post_step(client, sid, grads, "json")
    for name, value in averaged(client, sid).items():
        np.testing.assert_array_equal(value, model.numpy()[name])


def test_the_average_survives_a_restart_and_checkpoints(tmp_path: Path) -> None:
    settings = {"storage": "disk", "data_dir": str(tmp_path), "snapshot_every": 4}
    model = Model("float64", seed=2)
    config = {
        "optimizer": {"name": "Adam", "lr": 0.05},
        "params": model.initial(),
        "dtype": "float64",
        "averaging": {"kind": "ema", "decay": 0.8},
    }
    batches = [model.grads(model.batch())[0] for _ in range(10)]
    with make_client(**settings) as client:
        sid = client.post("/v1/sessions", json=config).json()["id"]
        for grads in batches[:7]:
            post_step(client, sid, grads, "json")
        before = averaged(client, sid)
        state = client.get(f"/v1/sessions/{sid}/state").content
    with make_client(**settings) as client:
        after = averaged(client, sid)
        for name in before:
            np.testing.assert_array_equal(after[name], before[name])
        copy = client.post("/v1/sessions", content=state, headers={"Content-Type": SAFETENSORS})
        assert copy.status_code == 201, copy.text
        for grads in batches[7:]:
            post_step(client, sid, grads, "json")
            post_step(client, copy.json()["id"], grads, "json")
        a, b = averaged(client, sid), averaged(client, copy.json()["id"])
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize(
    ("averaging", "field"),
    [
        ({"kind": "polyak"}, "averaging.kind"),
        ({"decay": 0.9}, "averaging.kind"),
        ({"kind": "ema", "decay": 1.5}, "averaging.decay"),
        ({"kind": "ema", "start": 3}, "averaging.start"),
        ({"kind": "swa", "every": 0}, "averaging.every"),
        ({"kind": "swa", "start": -1}, "averaging.start"),
        ("ema", "averaging"),
    ],
)
def test_bad_averaging_is_refused_naming_the_field(
    client: TestClient, averaging: Any, field: str
) -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1},
        "params": Model("float32").initial(),
        "averaging": averaging,
    }
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert field in [e.get("field") for e in document["errors"]], document
    assert client.get("/v1/sessions").json()["sessions"] == []


def test_averaging_needs_held_params(client: TestClient) -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1},
        "params": {"w": {"shape": [3]}},
        "averaging": {"kind": "ema", "decay": 0.9},
    }
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert "averaging" in [e.get("field") for e in document["errors"]]
    assert client.get("/v1/sessions").json()["sessions"] == []


def test_an_average_is_asked_of_a_session_without_one(client: TestClient) -> None:
    config = {"optimizer": {"name": "SGD", "lr": 0.1}, "params": {"w": {"shape": [1], "data": [1]}}}
    sid = client.post("/v1/sessions", json=config).json()["id"]
    problem(client.get(f"/v1/sessions/{sid}/params", params={"average": "true"}), 422)


def test_bad_swalr_arguments_are_refused(client: TestClient) -> None:
    for schedule, field in [
        ({"name": "SWALR"}, "schedule.swa_lr"),
        ({"name": "SWALR", "swa_lr": 0.1, "anneal_strategy": "exp"}, "schedule.anneal_strategy"),
        ({"name": "SWALR", "swa_lr": 0.1, "anneal_epochs": -1}, "schedule.anneal_epochs"),
        ({"name": "SWALR", "swa_lr": [0.1, 0.2]}, "schedule.swa_lr"),
    ]:
        config = {"optimizer": {"name": "SGD", "lr": 0.1}, "params": {"w": {"shape": [1]}}}
        document = problem(client.post("/v1/sessions", json={**config, "schedule": schedule}), 422)
        assert field in [e.get("field") for e in document["errors"]], (schedule, document)


def test_a_federated_session_takes_no_averaging(client: TestClient) -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 1.0},
        "params": {"w": {"shape": [2], "data": [1.0, 2.0]}},
        "aggregation": {"mode": "rounds", "clients_per_round": 2},
        "averaging": {"kind": "ema", "decay": 0.9},
    }
    document = problem(client.post("/v1/sessions", json=config), 422)
    assert "averaging" in [e.get("field") for e in document["errors"]]
    assert client.get("/v1/sessions").json()["sessions"] == []
