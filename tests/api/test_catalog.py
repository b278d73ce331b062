"""Catalogs and schedule preview."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import problem

TORCH_OPTIMIZERS = {
    "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "ASGD", "NAdam",
    "RAdam", "Rprop", "Adafactor", "Muon", "LBFGS",
}  # fmt: skip
FLOWER_STRATEGIES = {"FedAvg", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi"}
BEYOND_TORCH = {
    "Lion": "lion-pytorch",
    "AdamWScheduleFree": "schedulefree",
    "SGDScheduleFree": "schedulefree",
    "Prodigy": "prodigyopt",
    "CAME": "came-pytorch",
    "SOAP": "pytorch_optimizer",
}


def test_optimizer_catalog_lists_arguments_with_types_and_defaults(client: TestClient) -> None:
    response = client.get("/v1/optimizers")
    assert response.status_code == 200
    entries = {e["name"]: e for e in response.json()["optimizers"]}
    assert "SGD" in entries and "Adam" in entries
    assert set(entries) <= TORCH_OPTIMIZERS | FLOWER_STRATEGIES | set(BEYOND_TORCH)
    args = {a["name"]: a for a in entries["Adam"]["args"]}
    assert args["betas"]["default"] == [0.9, 0.999]
    assert args["eps"]["type"] == "float"


def test_optimizers_torch_lacks_name_their_reference_package(client: TestClient) -> None:
    entries = {e["name"]: e for e in client.get("/v1/optimizers").json()["optimizers"]}
    assert {n: entries[n].get("reference") for n in BEYOND_TORCH} == BEYOND_TORCH
    assert all("reference" not in entries[n] for n in TORCH_OPTIMIZERS)
    lion = {a["name"]: a["default"] for a in entries["Lion"]["args"]}
    assert lion == {
        "lr": 1e-4,
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
    }
    sgd = {a["name"]: a["default"] for a in entries["SGDScheduleFree"]["args"]}
    assert sgd["lr"] == 1.0 and sgd["momentum"] == 0.9 and sgd["warmup_steps"] == 0
    prodigy = {a["name"]: a["default"] for a in entries["Prodigy"]["args"]}
    assert prodigy["growth_rate"] == "inf" and prodigy["beta3"] is None and prodigy["d0"] == 1e-6


def test_schedule_catalog(client: TestClient) -> None:
    entries = {e["name"]: e for e in client.get("/v1/schedules").json()["schedules"]}
    assert {"StepLR", "CosineAnnealingLR", "OneCycleLR"} <= set(entries)
    assert {o["name"] for o in entries["StepLR"]["options"]} == {"interval", "every"}


def test_preview_gives_lr_per_step_per_group(client: TestClient) -> None:
    body = {
        "optimizer": {"name": "SGD", "lr": 1.0},
        "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.1},
        "steps": 5,
        "param_groups": [{"params": ["head"], "lr": 10.0}],
    }
    response = client.post("/v1/schedules/preview", json=body)
    assert response.status_code == 200, response.text
    lrs = response.json()["lr"]
    assert len(lrs) == 5 and all(len(row) == 2 for row in lrs)
    for base, column in ((1.0, 0), (10.0, 1)):
        closed_form = [base * 0.1 ** (n // 2) for n in range(5)]
        assert [row[column] for row in lrs] == pytest.approx(closed_form, rel=1e-12)


def test_preview_without_schedule_is_constant(client: TestClient) -> None:
    response = client.post(
        "/v1/schedules/preview", json={"optimizer": {"name": "SGD", "lr": 0.3}, "steps": 3}
    )
    assert response.json() == {"lr": [[0.3], [0.3], [0.3]], "optimizers": ["SGD"]}


def test_preview_validation(client: TestClient) -> None:
    fields = {
        e["field"]
        for e in problem(client.post("/v1/schedules/preview", json={"steps": 0, "x": 1}), 422)[
            "errors"
        ]
    }
    assert fields == {"optimizer", "steps", "x"}
    bad_schedule = {
        "optimizer": {"name": "SGD", "lr": 0.3},
        "schedule": {"name": "StepLR"},
        "steps": 3,
    }
    problem(client.post("/v1/schedules/preview", json=bad_schedule), 422, "invalid-hyperparameter")
    too_long = {"optimizer": {"name": "SGD"}, "steps": 10**9}
    problem(client.post("/v1/schedules/preview", json=too_long), 422)


def test_preview_of_reduce_on_plateau_follows_the_metrics(client: TestClient) -> None:
    # The metric improves for 3 steps, then stalls: with patience 1 the lr falls by
    # `factor` after the second non-improving step, and again two steps later.
    metrics = [3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    body = {
        "optimizer": {"name": "SGD", "lr": 1.0},
        "schedule": {"name": "ReduceLROnPlateau", "patience": 1, "factor": 0.5},
        "steps": len(metrics),
        "metrics": metrics,
    }
    response = client.post("/v1/schedules/preview", json=body)
    assert response.status_code == 200, response.text
    lrs = [row[0] for row in response.json()["lr"]]
    assert lrs == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    short = {**body, "metrics": metrics[:3]}
    problem(client.post("/v1/schedules/preview", json=short), 422)
    not_numbers = {**body, "metrics": ["a"] * len(metrics)}
    assert problem(client.post("/v1/schedules/preview", json=not_numbers), 422)["errors"] == [
        {"field": "metrics", "message": "must be a list of finite numbers, one per step"}
    ]
