"""Flower's server strategies run for a few rounds, and optserve's presets fed the same.

A scenario is a strategy with its Flower constructor arguments. :func:`run_flower` runs
``flwr.serverapp.strategy.<Name>.start`` itself (its own round loop, aggregation and
server update) against a scripted grid whose clients "train" deterministically from the
params they receive, and records every client result and the global params after every
round. :func:`run_optserve` feeds exactly those client results to optserve's aggregation
and preset optimizer. ``make_flower_fixtures`` stores Flower's traces so the comparison
also runs where flwr is not installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.core.federated import rounds
from service.core.federated.spec import parse_aggregation
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state

FIXTURES = Path(__file__).parent / "fixtures" / "flower"
INDEX = FIXTURES / "index.json"
SHAPES: dict[str, tuple[int, ...]] = {"layer.weight": (4, 3), "layer.bias": (3,)}
STRATEGIES = ("FedAvg", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi")


@dataclass(frozen=True)
class Scenario:
    id: str
    strategy: str
    """Flower's class name, which is also optserve's optimizer name."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Flower's constructor arguments (Flower's names, which optserve accepts as aliases)."""
    dtype: str = "float32"
    clients: int = 4
    rounds: int = 5
    seed: int = 0


SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        Scenario("fedavg", "FedAvg"),
        Scenario("fedavgm", "FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.9}),
        Scenario("fedavgm-defaults", "FedAvgM", seed=1),
        Scenario("fedadagrad", "FedAdagrad", {"eta": 0.05, "eta_l": 0.02, "tau": 0.01}),
        Scenario("fedadagrad-defaults", "FedAdagrad", seed=2),
        Scenario("fedadam", "FedAdam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
        Scenario("fedadam-defaults", "FedAdam", seed=3, clients=7),
        Scenario("fedyogi", "FedYogi", {"eta": 0.03, "beta_1": 0.85, "beta_2": 0.9, "tau": 1e-2}),
        Scenario("fedyogi-defaults", "FedYogi", seed=4, clients=3),
        Scenario("fedadam-float64", "FedAdam", {"eta": 0.2}, dtype="float64", seed=5),
        Scenario("fedyogi-float64", "FedYogi", {"eta": 0.1}, dtype="float64", seed=6),
    )
}


def describe(scenario: Scenario) -> dict[str, Any]:
    return {**asdict(scenario), "shapes": {k: list(v) for k, v in SHAPES.items()}}


@dataclass
class Trace:
    """What Flower did: the start, every client result, the global params after each round."""

    initial: dict[str, np.ndarray]
    results: list[list[tuple[int, int, dict[str, np.ndarray]]]]
    """Per round: (node id, num_examples, the client's new params), in Flower's order."""
    globals: list[dict[str, np.ndarray]]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"initial/{k}": v for k, v in self.initial.items()}
        for r, results in enumerate(self.results, start=1):
            for node, n, params in results:
                out[f"result/{r}/{node}/num_examples"] = np.array(n)
                out.update({f"result/{r}/{node}/{k}": v for k, v in params.items()})
        for r, params in enumerate(self.globals, start=1):
            out.update({f"global/{r}/{k}": v for k, v in params.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], scenario: Scenario) -> Trace:
        initial = {k: arrays[f"initial/{k}"] for k in SHAPES}
        results = []
        for r in range(1, scenario.rounds + 1):
            nodes = sorted(
                int(key.split("/")[2])
                for key in arrays
                if key.startswith(f"result/{r}/") and key.endswith("/num_examples")
            )
            results.append(
                [
                    (
                        node,
                        int(arrays[f"result/{r}/{node}/num_examples"]),
                        {k: arrays[f"result/{r}/{node}/{k}"] for k in SHAPES},
                    )
                    for node in nodes
                ]
            )
        globals_ = [
            {k: arrays[f"global/{r}/{k}"] for k in SHAPES} for r in range(1, scenario.rounds + 1)
        ]
        return cls(initial, results, globals_)


def initial_params(scenario: Scenario) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([scenario.seed, 0])
    return {k: rng.standard_normal(s).astype(scenario.dtype) for k, s in SHAPES.items()}


def local_training(
    scenario: Scenario, server_round: int, node: int, received: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
    """A client's deterministic "training": a pull towards its own optimum plus noise."""
    rng = np.random.default_rng([scenario.seed, server_round, node])
    out = {}
    for name, values in received.items():
        target = np.random.default_rng([scenario.seed, 1000 + node]).standard_normal(values.shape)
        noise = 0.05 * rng.standard_normal(values.shape)
        new = values + 0.3 * (target - values) + noise
        out[name] = np.asarray(new, dtype=scenario.dtype)
    return out, int(rng.integers(5, 120))


def run_flower(scenario: Scenario) -> Trace:
    """Run Flower's own strategy for ``scenario.rounds`` rounds (needs flwr)."""
    import importlib
    import logging

    # Imported by name: flwr is optional, and has no type information for mypy.
    strategies = importlib.import_module("flwr.serverapp.strategy")
    app = importlib.import_module("flwr.app")
    Array, ArrayRecord, Message = app.Array, app.ArrayRecord, app.Message
    MetricRecord, RecordDict = app.MetricRecord, app.RecordDict
    TaskIdentity = importlib.import_module("flwr.supercore.task_identity").TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Messages need a run and node identity outside a real Flower deployment.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    results: list[list[tuple[int, int, dict[str, np.ndarray]]]] = []
    globals_: list[dict[str, np.ndarray]] = []

    class ScriptedGrid:
        def get_node_ids(self) -> Iterable[int]:
            return list(range(1, scenario.clients + 1))

        def send_and_receive(self, messages: Iterable[Any], *, timeout: Any = None) -> list[Any]:
            replies = []
            batch: list[tuple[int, int, dict[str, np.ndarray]]] = []
            for message in messages:
                server_round = int(message.content["config"]["server-round"])
                received = {k: v.numpy() for k, v in message.content["arrays"].items()}
                params, n = local_training(
                    scenario, server_round, message.metadata.dst_node_id, received
                )
                batch.append((message.metadata.dst_node_id, n, params))
                content = RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
                        "metrics": MetricRecord({"num-examples": n}),
                    }
                )
                replies.append(Message(content, reply_to=message))
            if batch:
                results.append(batch)
            return replies

    def record(server_round: int, arrays: Any) -> None:
        if server_round > 0:
            globals_.append({k: np.array(v.numpy()) for k, v in arrays.items()})

    cls = getattr(strategies, scenario.strategy)
    strategy = cls(
        fraction_evaluate=0.0,
        min_train_nodes=scenario.clients,
        min_available_nodes=scenario.clients,
        **scenario.kwargs,
    )
    initial = initial_params(scenario)
    strategy.start(
        ScriptedGrid(),
        ArrayRecord({k: Array(v) for k, v in initial.items()}),
        num_rounds=scenario.rounds,
        evaluate_fn=record,
    )
    return Trace(initial, results, globals_)


def flower_defaults() -> dict[str, dict[str, Any]]:
    """Each strategy's server-side defaults, read off Flower's constructors (needs flwr)."""
    import importlib
    import inspect

    strategies = importlib.import_module("flwr.serverapp.strategy")

    names = {"eta", "eta_l", "beta_1", "beta_2", "tau", "server_learning_rate", "server_momentum"}
    out = {}
    for name in STRATEGIES:
        parameters = inspect.signature(getattr(strategies, name).__init__).parameters
        out[name] = {k: p.default for k, p in parameters.items() if k in names}
    return out


def config_for(scenario: Scenario) -> dict[str, Any]:
    """The optserve session config that reproduces the scenario's strategy."""
    return {
        "optimizer": {"name": scenario.strategy, **scenario.kwargs},
        "params": {k: {"shape": list(s)} for k, s in SHAPES.items()},
        "dtype": scenario.dtype,
        "aggregation": {"mode": "rounds", "clients_per_round": scenario.clients},
    }


def run_optserve(scenario: Scenario, trace: Trace) -> list[dict[str, np.ndarray]]:
    """The global params after each round when optserve aggregates Flower's client results."""
    config = config_for(scenario)
    plan = plan_from_config(config, ignore=("aggregation",))
    spec = parse_aggregation(config["aggregation"])
    assert spec is not None
    state = initial_state(plan)
    held = [np.array(trace.initial[t.name], dtype=plan.dtype) for t in plan.tensors]
    federation = rounds.start(spec, [t.shape for t in plan.tensors], 0, 0.0)
    out = []
    for results in trace.results:
        opened = federation.round
        assert opened is not None
        for node, n, params in results:
            delta = rounds.client_delta("params", [params[t.name] for t in plan.tensors], held)
            contribution = rounds.Contribution(str(node), n, float(n), rounds.norm(delta), "", 0.0)
            rounds.contribute(opened, contribution, delta)
        gradient = rounds.pseudo_gradient(opened.total, opened.weight, plan.dtype)
        deltas = [np.empty_like(h) for h in held]
        apply_step(plan, state, gradient, None, deltas)
        for values, d in zip(held, deltas, strict=True):
            values += d
        federation.round = rounds.next_round(opened, state.step, 0.0)
        out.append({t.name: v.copy() for t, v in zip(plan.tensors, held, strict=True)})
    return out


def load_index() -> dict[str, Any]:
    if not INDEX.exists():
        return {}
    index: dict[str, Any] = json.loads(INDEX.read_text())
    return index


def load_trace(scenario: Scenario) -> Trace:
    with np.load(FIXTURES / f"{scenario.id}.npz") as data:
        arrays = {name: data[name] for name in data.files}
    return Trace.from_arrays(arrays, scenario)
