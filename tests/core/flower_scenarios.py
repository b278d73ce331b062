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
    aggregator: dict[str, Any] | None = None
    """optserve's ``aggregation.aggregator``: on Flower's side the strategy of that name,
    mixed in under the server optimizer the way Flower's own FedOpt calls FedAvg's."""
    privacy: dict[str, Any] | None = None
    """optserve's ``aggregation.privacy``: on Flower's side its server-side DP wrapper."""
    poisoned: int = 0
    """Clients (the first ones) sending a sign-flipped, scaled update."""


_KRUM = {"name": "Krum", "num_malicious_clients": 1}
ROBUST = (
    Scenario("fedmedian", "FedAvg", aggregator={"name": "FedMedian"}, clients=5, poisoned=1),
    Scenario("fedmedian-even", "FedAvg", aggregator={"name": "FedMedian"}, seed=7, clients=6),
    Scenario(
        "fedtrimmedavg",
        "FedAvg",
        aggregator={"name": "FedTrimmedAvg", "beta": 0.25},
        seed=8,
        clients=8,
        poisoned=2,
    ),
    Scenario("krum", "FedAvg", aggregator=_KRUM, seed=9, clients=6, poisoned=1),
    Scenario(
        "multikrum",
        "FedAvg",
        aggregator={"name": "MultiKrum", "num_malicious_clients": 1, "num_clients_to_keep": 3},
        seed=10,
        clients=6,
        poisoned=1,
    ),
    Scenario(
        "bulyan",
        "FedAvg",
        aggregator={"name": "Bulyan", "num_malicious_clients": 1},
        seed=11,
        clients=8,
        poisoned=1,
    ),
    Scenario(
        "krum-fedadam", "FedAdam", {"eta": 0.05}, aggregator=_KRUM, seed=12, clients=6, poisoned=1
    ),
    Scenario(
        "fedmedian-fedavgm",
        "FedAvgM",
        {"server_learning_rate": 0.7, "server_momentum": 0.9},
        aggregator={"name": "FedMedian"},
        seed=13,
        clients=5,
        poisoned=1,
    ),
    Scenario(
        "dp-fixed",
        "FedAvg",
        privacy={"clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 0.0, "seed": 1},
        seed=14,
        clients=5,
    ),
    Scenario(
        "dp-fixed-fedyogi",
        "FedYogi",
        {"eta": 0.03},
        privacy={"clipping": "fixed", "clipping_norm": 0.8, "noise_multiplier": 0.0, "seed": 2},
        seed=15,
        clients=5,
    ),
    Scenario(
        "dp-adaptive",
        "FedAvg",
        privacy={"clipping": "adaptive", "noise_multiplier": 0.0, "seed": 3},
        seed=16,
        clients=5,
    ),
    Scenario(
        "dp-adaptive-tuned",
        "FedAvg",
        privacy={
            "clipping": "adaptive",
            "clipping_norm": 0.5,
            "noise_multiplier": 0.0,
            "target_unclipped_quantile": 0.8,
            "clip_norm_lr": 0.5,
            "seed": 4,
        },
        seed=17,
        clients=5,
    ),
    Scenario(
        "dp-fixed-krum",
        "FedAvg",
        aggregator=_KRUM,
        privacy={"clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 0.0, "seed": 5},
        seed=18,
        clients=6,
        poisoned=1,
    ),
)

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
        *ROBUST,
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
        step = 0.3 * (target - values) + noise
        if node <= scenario.poisoned:
            step *= -5.0  # an attacker: the honest step, flipped and scaled
        out[name] = np.asarray(values + step, dtype=scenario.dtype)
    return out, int(rng.integers(5, 120))


def run_flower(scenario: Scenario) -> Trace:
    """Run Flower's own strategy for ``scenario.rounds`` rounds (needs flwr)."""
    import importlib
    import logging

    # Imported by name: flwr is optional, and has no type information for mypy.
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

    strategy = flower_strategy(scenario)
    initial = initial_params(scenario)
    strategy.start(
        ScriptedGrid(),
        ArrayRecord({k: Array(v) for k, v in initial.items()}),
        num_rounds=scenario.rounds,
        evaluate_fn=record,
    )
    return Trace(initial, results, globals_)


FLOWER_AGGREGATOR_ARGS = {
    "num_malicious_clients": "num_malicious_nodes",
    "num_clients_to_keep": "num_nodes_to_select",
    "beta": "beta",
}


def flower_strategy(scenario: Scenario) -> Any:
    """Flower's strategy for the scenario: its server optimizer, the aggregator mixed in
    below it (Flower's FedOpt takes the aggregate from ``super().aggregate_train``), and
    the DP wrapper around both."""
    import importlib
    import math

    strategies = importlib.import_module("flwr.serverapp.strategy")
    cls = getattr(strategies, scenario.strategy)
    aggregator = dict(scenario.aggregator or {})
    if aggregator:
        robust = getattr(strategies, aggregator.pop("name"))
        cls = robust if scenario.strategy == "FedAvg" else type("Robust", (cls, robust), {})
    strategy = cls(
        fraction_evaluate=0.0,
        min_train_nodes=scenario.clients,
        min_available_nodes=scenario.clients,
        **scenario.kwargs,
    )
    for name, value in aggregator.items():
        setattr(strategy, FLOWER_AGGREGATOR_ARGS[name], value)
    privacy = scenario.privacy
    if privacy is None:
        return strategy
    if privacy["clipping"] == "fixed":
        return strategies.DifferentialPrivacyServerSideFixedClipping(
            strategy, privacy["noise_multiplier"], privacy["clipping_norm"], scenario.clients
        )

    class PaperRule(strategies.DifferentialPrivacyServerSideAdaptiveClipping):  # type: ignore[misc,name-defined]
        """Flower's loop, with Andrew et al.'s rule: the unclipped fraction in the update."""

        def _geometric_update(self, clipped_fraction: float) -> None:
            unclipped = 1.0 - clipped_fraction
            self.clipping_norm *= math.exp(
                -self.clip_norm_lr * (unclipped - self.target_clipped_quantile)
            )

    return PaperRule(
        strategy,
        privacy["noise_multiplier"],
        scenario.clients,
        initial_clipping_norm=privacy.get("clipping_norm", 0.1),
        target_clipped_quantile=privacy.get("target_unclipped_quantile", 0.5),
        clip_norm_lr=privacy.get("clip_norm_lr", 0.2),
    )


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
        "aggregation": {
            "mode": "rounds",
            "clients_per_round": scenario.clients,
            "min_clients": scenario.clients,
            "aggregator": scenario.aggregator,
            "privacy": scenario.privacy,
        },
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
        closing = rounds.closing(federation, plan.dtype)
        federation.privacy = closing.privacy
        deltas = [np.empty_like(h) for h in held]
        apply_step(plan, state, closing.gradient, None, deltas)
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
