"""Flower's server strategies, reproduced: the global params after every round agree with
flwr's own FedAvg, FedAvgM, FedAdagrad, FedAdam and FedYogi fed the same client results.

With flwr importable the strategies run live; without it, the traces recorded by
``python -m tests.core.make_flower_fixtures`` stand in for them (the client results and
Flower's global params; optserve's side is always computed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.plan import plan_from_config
from tests.core.flower_scenarios import (
    SCENARIOS,
    STRATEGIES,
    Scenario,
    Trace,
    describe,
    flower_defaults,
    load_index,
    load_trace,
    run_flower,
    run_optserve,
)

LIVE = importlib.util.find_spec("flwr") is not None
TOLERANCE = {"float32": 1e-6, "float64": 1e-12}


def flower_trace(scenario: Scenario) -> Trace:
    if LIVE:
        return run_flower(scenario)
    recorded = load_index().get("scenarios", {}).get(scenario.id)
    assert recorded == describe(scenario), (
        f"fixture for {scenario.id} is stale: python -m tests.core.make_flower_fixtures"
    )
    return load_trace(scenario)


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=list(SCENARIOS))
def test_global_params_match_flower_after_every_round(scenario: Scenario) -> None:
    trace = flower_trace(scenario)
    assert len(trace.globals) == scenario.rounds == 5
    ours = run_optserve(scenario, trace)
    tolerance = TOLERANCE[scenario.dtype]
    for r, (mine, theirs) in enumerate(zip(ours, trace.globals, strict=True), start=1):
        for name, values in theirs.items():
            np.testing.assert_allclose(
                mine[name], values, rtol=0, atol=tolerance, err_msg=f"round {r}, {name}"
            )
    # The test can fail: the server moved the params, by much more than the tolerance.
    moved = max(
        float(np.max(np.abs(ours[-1][k] - trace.initial[k].astype(np.float64))))
        for k in trace.initial
    )
    assert moved > 100 * tolerance


def test_fixtures_match_a_live_run() -> None:
    """The committed traces are what flwr produces now (only checked where flwr is).

    Flower samples the clients in a random order, so its sums round differently from run
    to run: equal within the parity tolerance, not bit for bit.
    """
    if not LIVE:
        pytest.skip("flwr is not installed; the fixtures stand in for it")
    for scenario in SCENARIOS.values():
        live, stored = run_flower(scenario), load_trace(scenario)
        for a, b in zip(live.globals, stored.globals, strict=True):
            for name in a:
                np.testing.assert_allclose(a[name], b[name], rtol=0, atol=TOLERANCE[scenario.dtype])


def _defaults() -> dict[str, dict[str, Any]]:
    return flower_defaults() if LIVE else load_index()["defaults"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_defaults_are_flowers(name: str) -> None:
    aliases = {"eta": "lr", "server_learning_rate": "lr", "server_momentum": "momentum"}
    theirs = {aliases.get(k, k): v for k, v in _defaults()[name].items()}
    if name == "FedAvg":
        theirs = {"lr": 1.0}  # Flower's FedAvg takes the average as is
    ours = {a.name: a.default for a in optimizers.get(name).args}
    assert ours == theirs


def _config(optimizer: dict[str, Any]) -> dict[str, Any]:
    return {"optimizer": optimizer, "params": {"w": {"shape": [2]}}}


@pytest.mark.parametrize(
    ("optimizer", "field"),
    [
        ({"name": "FedAdam", "eta": 0.1, "lr": 0.1}, "optimizer.eta"),
        ({"name": "FedAdam", "tau": 0.0}, "optimizer.tau"),
        ({"name": "FedYogi", "beta_2": 1.0}, "optimizer.beta_2"),
        ({"name": "FedAdam", "beta_1": -0.1}, "optimizer.beta_1"),
        ({"name": "FedAdagrad", "eta": -1.0}, "optimizer.lr"),
        ({"name": "FedAdagrad", "beta_1": 0.9}, "optimizer.beta_1"),
        ({"name": "FedAvgM", "server_momentum": -0.5}, "optimizer.momentum"),
        ({"name": "FedAvg", "momentum": 0.9}, "optimizer.momentum"),
    ],
)
def test_invalid_hyperparameters_name_the_field(optimizer: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(_config(optimizer))
    assert caught.value.argument == field


def test_flower_names_are_aliases() -> None:
    plan = plan_from_config(_config({"name": "fedyogi", "eta": 0.2, "eta_l": 0.5}))
    assert plan.optimizer.name == "FedYogi"
    assert plan.describe()["optimizer"] == {
        "name": "FedYogi",
        "lr": 0.2,
        "eta_l": 0.5,
        "beta_1": 0.9,
        "beta_2": 0.99,
        "tau": 1e-3,
    }
    entry = plan.optimizer.describe()
    assert entry["aliases"] == {"eta": "lr"} and entry["family"] == "flower"
    momentum = plan_from_config(_config({"name": "FedAvgM", "server_momentum": 0.5}))
    assert momentum.describe()["optimizer"]["momentum"] == 0.5


ROBUST = [s for s in SCENARIOS.values() if s.aggregator is not None or s.privacy is not None]


@pytest.mark.parametrize("scenario", ROBUST, ids=[s.id for s in ROBUST])
def test_the_aggregator_and_clipping_change_the_outcome(scenario: Scenario) -> None:
    """Each robust or private scenario ends far from plain averaging of the same results, so
    matching Flower above says the aggregator (or the clipping) was really applied."""
    trace = flower_trace(scenario)
    plain = dataclasses.replace(scenario, aggregator=None, privacy=None)
    ours, averaged = run_optserve(scenario, trace), run_optserve(plain, trace)
    gap = max(
        float(np.max(np.abs(mine[k] - plain_[k])))
        for mine, plain_ in zip(ours, averaged, strict=True)
        for k in trace.initial
    )
    assert gap > 100 * TOLERANCE[scenario.dtype]
