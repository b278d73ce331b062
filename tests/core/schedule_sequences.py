"""Learning-rate sequences: every schedule with non-default arguments, run in optserve and torch.

A :class:`Sequence` is a schedule config, the optimizer family it sits on (which decides
whether momentum or beta1 can be cycled) and the lrs of its param groups. A *trace* is
what the groups hold after construction and after every step: each key torch's
schedulers read or write (``lr``, ``initial_lr``, ``momentum``, ``betas``, ...) plus
``last_lr``. Traces compare exactly: both sides do the same float arithmetic.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from service.core import schedules

Trace = dict[str, list[list[Any]]]
"""key -> per group, the value after construction and after each step."""

TRACKED = ("lr", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "momentum")
"""Group keys a schedule may read or write; ``beta1`` is traced from ``betas``."""

OPTIMIZER_GROUPS: dict[str, dict[str, Any]] = {
    # Every resolved hyperparameter of each optimizer, as optserve's groups hold them.
    "SGD": {
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    },
    "Adam": {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    },
    "Adagrad": {
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
    },
}


@dataclass(frozen=True)
class Sequence:
    id: str
    schedule: dict[str, Any]
    optimizer: str = "SGD"
    lrs: tuple[float, ...] = (0.1, 0.03)
    steps: int = 300
    metrics: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        """JSON form, stored with the fixture to detect a stale one."""
        described: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return described


def metric_at(step: int) -> float:
    """A loss that falls, then plateaus with some noise: enough to trigger reductions."""
    return 1.0 / (1.0 + 0.05 * min(step, 60)) + 0.01 * ((step * 37) % 11) / 11


def _warmup_cosine() -> dict[str, Any]:
    return {
        "name": "SequentialLR",
        "schedulers": [
            {"name": "LinearLR", "start_factor": 0.1, "total_iters": 20},
            {"name": "CosineAnnealingLR", "T_max": 100, "eta_min": 1e-4},
        ],
        "milestones": [20],
    }


SEQUENCES: list[Sequence] = [
    Sequence("steplr", {"name": "StepLR", "step_size": 7, "gamma": 0.5}),
    Sequence(
        "multisteplr-repeated",
        {"name": "MultiStepLR", "milestones": [30, 80, 80, 150], "gamma": 0.3},
        lrs=(0.2, 0.05, 0.01),
    ),
    Sequence("constantlr", {"name": "ConstantLR", "factor": 0.25, "total_iters": 40}),
    Sequence(
        "linearlr-decay",
        {"name": "LinearLR", "start_factor": 0.9, "end_factor": 0.05, "total_iters": 77},
    ),
    Sequence("linearlr-warmup", {"name": "LinearLR", "start_factor": 0.1, "total_iters": 50}),
    Sequence("exponentiallr", {"name": "ExponentialLR", "gamma": 0.985}, optimizer="Adagrad"),
    Sequence("polynomiallr", {"name": "PolynomialLR", "total_iters": 120, "power": 2.5}),
    Sequence(
        "cosineannealinglr",
        {"name": "CosineAnnealingLR", "T_max": 45, "eta_min": 1e-4},
        lrs=(0.2, 0.05, 0.01),
    ),
    Sequence(
        "warmrestarts-tmult2",
        {"name": "CosineAnnealingWarmRestarts", "T_0": 10, "T_mult": 2, "eta_min": 1e-3},
    ),
    Sequence(
        "warmrestarts-tmult1",
        {"name": "CosineAnnealingWarmRestarts", "T_0": 17, "eta_min": 0.0},
        optimizer="Adam",
    ),
    Sequence(
        "cycliclr-triangular-sgd",
        {
            "name": "CyclicLR",
            "base_lr": [0.01, 0.002],
            "max_lr": 0.1,
            "step_size_up": 20,
            "step_size_down": 30,
        },
    ),
    Sequence(
        "cycliclr-triangular2-adam-beta1",
        {
            "name": "CyclicLR",
            "base_lr": 1e-4,
            "max_lr": [1e-2, 5e-3],
            "step_size_up": 25,
            "mode": "triangular2",
            "base_momentum": 0.7,
            "max_momentum": [0.95, 0.9],
        },
        optimizer="Adam",
    ),
    Sequence(
        "cycliclr-exprange-no-momentum",
        {
            "name": "CyclicLR",
            "base_lr": 0.001,
            "max_lr": 0.05,
            "step_size_up": 15,
            "step_size_down": 5,
            "mode": "exp_range",
            "gamma": 0.995,
            "cycle_momentum": False,
        },
        optimizer="Adagrad",
    ),
    Sequence(
        "onecyclelr-sgd",
        {
            "name": "OneCycleLR",
            "max_lr": 0.5,
            "total_steps": 300,
            "pct_start": 0.25,
            "div_factor": 10.0,
            "final_div_factor": 100.0,
        },
    ),
    Sequence(
        "onecyclelr-three-phase-linear-adam",
        {
            "name": "OneCycleLR",
            "max_lr": [0.01, 0.004],
            "epochs": 10,
            "steps_per_epoch": 31,
            "anneal_strategy": "linear",
            "three_phase": True,
            "base_momentum": [0.8, 0.75],
        },
        optimizer="Adam",
    ),
    Sequence("sequential-warmup-cosine", _warmup_cosine(), lrs=(0.2, 0.05, 0.01)),
    Sequence(
        "sequential-closed-forms",
        {
            "name": "SequentialLR",
            "schedulers": [
                {"name": "ConstantLR", "factor": 0.5, "total_iters": 4},
                {"name": "ExponentialLR", "gamma": 0.97},
                {"name": "StepLR", "step_size": 9, "gamma": 0.6},
                {"name": "MultiStepLR", "milestones": [3, 30], "gamma": 0.5},
                {"name": "PolynomialLR", "total_iters": 50, "power": 1.5},
                {"name": "ConstantLR", "factor": 0.2, "total_iters": 10},
            ],
            "milestones": [10, 60, 120, 170, 230],
        },
    ),
    Sequence(
        "sequential-restarts-and-cycles",
        {
            "name": "SequentialLR",
            "schedulers": [
                {"name": "CosineAnnealingWarmRestarts", "T_0": 7, "T_mult": 2},
                {"name": "CyclicLR", "base_lr": 0.001, "max_lr": 0.05, "step_size_up": 10},
                {"name": "CosineAnnealingLR", "T_max": 30},
                {"name": "OneCycleLR", "max_lr": 0.2, "total_steps": 100},
            ],
            "milestones": [40, 100, 200],
        },
    ),
    Sequence(
        "sequential-milestone-zero",
        {
            "name": "SequentialLR",
            "schedulers": [
                {"name": "ExponentialLR", "gamma": 0.5},
                {"name": "LinearLR", "start_factor": 0.5, "total_iters": 10},
            ],
            "milestones": [0],
        },
    ),
    Sequence(
        "sequential-two-onecycles",
        # The second OneCycleLR overwrites initial_lr, max_lr and min_lr in the groups,
        # and torch's first one reads those overwritten values.
        {
            "name": "SequentialLR",
            "schedulers": [
                {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 100},
                {"name": "OneCycleLR", "max_lr": 1.0, "total_steps": 250, "div_factor": 5.0},
            ],
            "milestones": [60],
        },
        optimizer="Adam",
    ),
    Sequence(
        "chained-constant-exponential",
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "ConstantLR", "factor": 0.1, "total_iters": 2},
                {"name": "ExponentialLR", "gamma": 0.9},
            ],
        },
    ),
    Sequence(
        "chained-resumed-last-epoch",
        # The second schedule resumes (last_epoch >= 0) from the initial_lr the first set.
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "LinearLR", "start_factor": 0.5, "total_iters": 30},
                {"name": "CosineAnnealingLR", "T_max": 40, "last_epoch": 5},
                {"name": "StepLR", "step_size": 6, "gamma": 0.8, "last_epoch": 3},
                {"name": "ExponentialLR", "gamma": 0.99, "last_epoch": 0},
            ],
        },
    ),
    Sequence(
        "chained-onecycle-cyclic",
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "OneCycleLR", "max_lr": 0.3, "total_steps": 320},
                {"name": "CyclicLR", "base_lr": 0.5, "max_lr": 1.0, "step_size_up": 13},
            ],
        },
        optimizer="Adam",
    ),
    Sequence(
        "nested-sequential-chained",
        {
            "name": "SequentialLR",
            "schedulers": [
                {
                    "name": "ChainedScheduler",
                    "schedulers": [
                        {"name": "LinearLR", "start_factor": 0.2, "total_iters": 15},
                        {"name": "StepLR", "step_size": 5, "gamma": 0.9},
                    ],
                },
                {"name": "CosineAnnealingLR", "T_max": 60},
            ],
            "milestones": [50],
            "last_epoch": 2,
        },
    ),
    Sequence(
        "nested-sequential-sequential",
        {
            "name": "SequentialLR",
            "schedulers": [_warmup_cosine(), {"name": "ExponentialLR", "gamma": 0.99}],
            "milestones": [150],
        },
    ),
    Sequence(
        "nested-chained-sequential",
        {
            "name": "ChainedScheduler",
            "schedulers": [
                _warmup_cosine(),
                {"name": "MultiStepLR", "milestones": [100, 200], "gamma": 0.5},
            ],
        },
    ),
    Sequence(
        "plateau-min-rel",
        {
            "name": "ReduceLROnPlateau",
            "factor": 0.5,
            "patience": 3,
            "cooldown": 2,
            "min_lr": [0.01, 0.001],
        },
        metrics=True,
    ),
    Sequence(
        "plateau-max-abs",
        {
            "name": "ReduceLROnPlateau",
            "mode": "max",
            "threshold_mode": "abs",
            "threshold": 0.001,
            "factor": 0.3,
            "patience": 0,
            "eps": 1e-4,
            "min_lr": 1e-3,
        },
        lrs=(0.2, 0.05, 0.01),
        metrics=True,
    ),
]


def initial_groups(seq: Sequence) -> list[dict[str, Any]]:
    return [{"lr": lr, **OPTIMIZER_GROUPS[seq.optimizer]} for lr in seq.lrs]


def _snapshot(trace: Trace, groups: list[dict[str, Any]], last_lr: list[Any]) -> None:
    for key in (*TRACKED, "beta1"):
        per_group = [
            (g["betas"][0] if "betas" in g else None) if key == "beta1" else g.get(key)
            for g in groups
        ]
        if any(v is not None for v in per_group) or key in trace:
            columns = trace.setdefault(key, [[] for _ in groups])
            for column, value in zip(columns, per_group, strict=True):
                column.append(value)
    columns = trace.setdefault("last_lr", [[] for _ in groups])
    for column, value in zip(columns, last_lr, strict=True):
        column.append(float(value))


def run_optserve(seq: Sequence, json_round_trip: bool) -> Trace:
    """The trace of optserve's schedule; with ``json_round_trip`` the schedule state and
    the groups go through JSON after every step, as a checkpoint would take them."""
    schedule = schedules.get(seq.schedule["name"])
    config = schedule.resolve({k: v for k, v in seq.schedule.items() if k != "name"})
    groups = initial_groups(seq)
    state = schedule.start(config, groups)
    trace: Trace = {}
    _snapshot(trace, groups, state["last_lr"])
    for step in range(1, seq.steps + 1):
        if json_round_trip:
            state = json.loads(json.dumps(state, allow_nan=False))
            groups = json.loads(json.dumps(groups, allow_nan=False))
        metric = metric_at(step) if seq.metrics else None
        state = schedule.step(config, state, groups, metric)
        _snapshot(trace, groups, state["last_lr"])
    return trace


def torch_optimizer(seq: Sequence) -> Any:
    """A torch optimizer with one single-parameter group per lr."""
    import torch

    cls = getattr(torch.optim, seq.optimizer)
    params = [[torch.zeros(1, requires_grad=True)] for _ in seq.lrs]
    defaults = {k: v for k, v in OPTIMIZER_GROUPS[seq.optimizer].items() if k != "lr"}
    return cls([{"params": p, "lr": lr} for p, lr in zip(params, seq.lrs, strict=True)], **defaults)


def run_torch(seq: Sequence) -> Trace:
    """The trace of torch.optim.lr_scheduler on the same groups."""
    import torch

    from tests.core.torch_reference import build_scheduler

    with warnings.catch_warnings():
        # torch warns about call order heuristics that do not apply here.
        warnings.simplefilter("ignore", UserWarning)
        optimizer = torch_optimizer(seq)
        scheduler = build_scheduler(torch, optimizer, seq.schedule)
        trace: Trace = {}
        _snapshot(trace, optimizer.param_groups, scheduler.get_last_lr())
        for step in range(1, seq.steps + 1):
            optimizer.step()
            if seq.metrics:
                scheduler.step(metric_at(step))
            else:
                scheduler.step()
            _snapshot(trace, optimizer.param_groups, scheduler.get_last_lr())
    return trace


def compress(trace: Trace) -> dict[str, Any]:
    """A fixture's form of a trace: a constant column becomes ``{"constant": v}`` and a
    key whose columns equal an earlier key's becomes ``{"same_as": key}``."""
    out: dict[str, Any] = {}
    for key, columns in trace.items():
        twin = next((k for k in out if trace[k] == columns), None)
        if twin is not None:
            out[key] = {"same_as": twin}
            continue
        out[key] = [
            {"constant": column[0]} if all(_same(v, column[0]) for v in column) else column
            for column in columns
        ]
    return out


def expand(stored: Mapping[str, Any], steps: int) -> Trace:
    trace: Trace = {}
    for key, columns in stored.items():
        if isinstance(columns, dict):
            trace[key] = [list(column) for column in trace[columns["same_as"]]]
            continue
        trace[key] = [
            [column["constant"]] * (steps + 1) if isinstance(column, dict) else list(column)
            for column in columns
        ]
    return trace


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b) and type(a) is type(b)
