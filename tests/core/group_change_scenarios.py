"""Schedules that run while param groups are added or edited, in optserve and in torch.

A :class:`Scenario` is a schedule on a few groups plus :class:`Event`\\ s: after ``at``
steps (0: right after the schedule was created, before its first step) a group is
appended (torch's ``optimizer.add_param_group``) or a group's hyperparameter is edited
by hand (``param_groups[i][key] = value``). An *outcome* holds a snapshot of the groups
(the keys schedules read or write, beta1 for ``betas``) and ``last_lr`` after
construction and after every step, taken before that step's events, and how the run
ended: torch raising at a step, or optserve refusing an event or a step.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from service.core import schedules
from service.core.errors import InvalidInput
from service.core.schedules.group_values import clone
from tests.core.schedule_sequences import OPTIMIZER_GROUPS, TRACKED

Snapshot = dict[str, Any]
Outcome = dict[str, Any]


@dataclass(frozen=True)
class Event:
    at: int
    """Steps taken before the event (0: before the first step)."""
    kind: str
    """``"add"``: append a group with ``values`` over the optimizer's defaults;
    ``"edit"``: set ``values`` in group ``group``."""
    values: dict[str, Any]
    group: int = 0


@dataclass(frozen=True)
class Scenario:
    id: str
    schedule: dict[str, Any]
    events: tuple[Event, ...]
    optimizer: str = "SGD"
    lrs: tuple[float, ...] = (0.1, 0.03)
    steps: int = 30
    metrics: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        """JSON form, stored with the fixture to detect a stale one."""
        described: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return described


def add(at: int, lr: float, **overrides: Any) -> Event:
    return Event(at, "add", {"lr": lr, **overrides})


def edit(at: int, group: int = 0, **values: Any) -> Event:
    return Event(at, "edit", values, group)


def metric_at(step: int) -> float:
    """A loss that falls for 8 steps, then plateaus with noise: reductions within 30 steps."""
    return 1.0 / (1.0 + 0.2 * min(step, 8)) + 0.01 * ((step * 37) % 11) / 11


WARMUP_COSINE = {
    "name": "SequentialLR",
    "schedulers": [
        {"name": "LinearLR", "start_factor": 0.2, "total_iters": 5},
        {"name": "CosineAnnealingLR", "T_max": 40, "eta_min": 1e-3},
    ],
    "milestones": [5],
}
CYCLIC_SGD = {
    "name": "CyclicLR",
    "base_lr": [0.01, 0.002],
    "max_lr": 0.1,
    "step_size_up": 5,
    "step_size_down": 7,
}
CYCLIC_ADAM = {
    "name": "CyclicLR",
    "base_lr": 1e-4,
    "max_lr": [1e-2, 5e-3],
    "step_size_up": 4,
    "mode": "triangular2",
    "base_momentum": 0.7,
    "max_momentum": [0.95, 0.9],
}
ONE_CYCLE = {
    "name": "OneCycleLR",
    "max_lr": 0.5,
    "total_steps": 30,
    "pct_start": 0.3,
    "div_factor": 10.0,
    "final_div_factor": 100.0,
}
ONE_CYCLE_THREE_PHASE = {
    "name": "OneCycleLR",
    "max_lr": [0.01, 0.004],
    "total_steps": 30,
    "anneal_strategy": "linear",
    "three_phase": True,
    "base_momentum": [0.8, 0.75],
}
PLATEAU = {"name": "ReduceLROnPlateau", "factor": 0.5, "patience": 2, "cooldown": 1}

SCENARIOS: list[Scenario] = [
    Scenario(
        "steplr-add-before-first-step",
        {"name": "StepLR", "step_size": 4, "gamma": 0.5},
        (add(0, 0.05),),
    ),
    Scenario(
        "steplr-add-midrun-and-edits",
        {"name": "StepLR", "step_size": 4, "gamma": 0.5},
        (add(6, 0.2, momentum=0.5), edit(9, lr=0.07), edit(13, 2, lr=0.4)),
    ),
    Scenario(
        "multisteplr-add-before-repeated-milestone",
        {"name": "MultiStepLR", "milestones": [3, 8, 8, 15], "gamma": 0.3},
        (add(7, 0.25), edit(10, lr=0.5)),
        lrs=(0.2, 0.05, 0.01),
    ),
    Scenario(
        "constantlr-add-while-factor-applies",
        # torch divides the added group's lr by a factor it never multiplied it by.
        {"name": "ConstantLR", "factor": 0.25, "total_iters": 10},
        (add(4, 0.08), edit(6, 1, lr=0.02)),
    ),
    Scenario(
        "constantlr-edit-before-total-iters",
        {"name": "ConstantLR", "factor": 0.25, "total_iters": 10},
        (edit(9, lr=0.5),),
    ),
    Scenario(
        "linearlr-adds-before-first-step-and-midrun",
        {"name": "LinearLR", "start_factor": 0.2, "end_factor": 0.9, "total_iters": 12},
        (add(0, 0.3), add(5, 0.06), edit(7, lr=0.011)),
    ),
    Scenario(
        "exponentiallr-adagrad-add-and-edit",
        {"name": "ExponentialLR", "gamma": 0.9},
        (add(3, 0.5, lr_decay=0.01), edit(12, lr=0.9)),
        optimizer="Adagrad",
    ),
    Scenario(
        "polynomiallr-add-and-edit-past-total-iters",
        {"name": "PolynomialLR", "total_iters": 20, "power": 2.0},
        (add(8, 0.7), edit(15, lr=0.2), edit(24, 2, lr=0.3)),
    ),
    Scenario(
        "cosine-add-fails-after-t-max",
        {"name": "CosineAnnealingLR", "T_max": 10, "eta_min": 1e-3},
        (add(3, 0.05),),
    ),
    Scenario(
        "cosine-add-refused-before-the-step-after-t-max",
        {"name": "CosineAnnealingLR", "T_max": 10, "eta_min": 1e-3},
        (add(10, 0.05),),
    ),
    Scenario(
        "cosine-edit-continues",
        {"name": "CosineAnnealingLR", "T_max": 10, "eta_min": 1e-3},
        (edit(5, lr=0.3), edit(17, 1, lr=0.01)),
    ),
    Scenario(
        "warmrestarts-add-refused",
        {"name": "CosineAnnealingWarmRestarts", "T_0": 5, "T_mult": 2, "eta_min": 1e-3},
        (add(4, 0.05),),
    ),
    Scenario(
        "warmrestarts-edit-overwritten",
        {"name": "CosineAnnealingWarmRestarts", "T_0": 5, "T_mult": 2, "eta_min": 1e-3},
        (edit(3, lr=1.0),),
    ),
    Scenario("cycliclr-sgd-add-refused-mid-cycle", CYCLIC_SGD, (add(6, 0.05),)),
    Scenario(
        "cycliclr-sgd-edits-overwritten",
        CYCLIC_SGD,
        (edit(4, lr=0.5), edit(8, 1, momentum=0.1)),
    ),
    Scenario(
        "cycliclr-adam-edit-betas-then-add-refused",
        CYCLIC_ADAM,
        (edit(5, betas=[0.5, 0.95]), add(9, 0.001)),
        optimizer="Adam",
    ),
    Scenario(
        "cycliclr-no-momentum-add-refused",
        {
            "name": "CyclicLR",
            "base_lr": 0.001,
            "max_lr": 0.05,
            "step_size_up": 3,
            "mode": "exp_range",
            "gamma": 0.99,
            "cycle_momentum": False,
        },
        (add(3, 0.01),),
        optimizer="Adagrad",
    ),
    Scenario("onecyclelr-add-refused-mid-cycle", ONE_CYCLE, (add(10, 0.05),)),
    Scenario(
        "onecyclelr-edits-overwritten",
        ONE_CYCLE,
        (edit(5, lr=0.9), edit(7, 1, momentum=0.2)),
    ),
    Scenario(
        "onecyclelr-three-phase-adam-edit-betas",
        ONE_CYCLE_THREE_PHASE,
        (edit(12, betas=[0.6, 0.9]),),
        optimizer="Adam",
    ),
    Scenario(
        "onecyclelr-adam-add-before-first-step-refused",
        ONE_CYCLE_THREE_PHASE,
        (add(0, 0.001),),
        optimizer="Adam",
    ),
    Scenario(
        "sequential-add-fails-at-later-milestone",
        WARMUP_COSINE,
        (add(2, 0.05),),
        lrs=(0.2, 0.05, 0.01),
    ),
    Scenario(
        "sequential-add-refused-before-milestone-step",
        WARMUP_COSINE,
        (add(4, 0.05),),
    ),
    Scenario(
        "sequential-add-after-milestone-and-edits",
        WARMUP_COSINE,
        (edit(3, lr=0.5), add(8, 0.05), edit(12, lr=0.02)),
    ),
    Scenario(
        "sequential-closed-form-edit-then-add",
        {
            "name": "SequentialLR",
            "schedulers": [
                {"name": "ExponentialLR", "gamma": 0.9},
                {"name": "StepLR", "step_size": 3, "gamma": 0.5},
            ],
            "milestones": [10],
        },
        (edit(6, lr=0.9), add(12, 0.3), edit(14, 2, lr=0.05)),
    ),
    Scenario(
        "chained-constant-exponential-add-and-edit",
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "ConstantLR", "factor": 0.5, "total_iters": 5},
                {"name": "ExponentialLR", "gamma": 0.9},
            ],
        },
        (add(2, 0.2), edit(8, lr=0.03)),
    ),
    Scenario(
        "chained-with-cyclic-add-refused",
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "ExponentialLR", "gamma": 0.95},
                {"name": "CyclicLR", "base_lr": 0.01, "max_lr": 0.05, "step_size_up": 4},
            ],
        },
        (edit(2, lr=0.3), add(5, 0.02)),
    ),
    Scenario(
        "plateau-one-min-lr-add-and-edit",
        {**PLATEAU, "min_lr": 0.001},
        (add(5, 0.2), edit(14, lr=0.5)),
        metrics=True,
    ),
    Scenario(
        "plateau-per-group-min-lr-add-refused",
        {**PLATEAU, "min_lr": [0.01, 0.001]},
        (edit(3, 1, lr=0.3), add(5, 0.2)),
        metrics=True,
    ),
]


def _snapshot(groups: list[dict[str, Any]], last_lr: list[Any]) -> Snapshot:
    snapped = []
    for group in groups:
        values = {key: group[key] for key in TRACKED if key in group}
        if "betas" in group:
            values["beta1"] = group["betas"][0]
        snapped.append(values)
    return {"groups": snapped, "last_lr": [float(v) for v in last_lr]}


def _events_at(sc: Scenario, at: int) -> list[tuple[int, Event]]:
    return [(i, ev) for i, ev in enumerate(sc.events) if ev.at == at]


def _refused(
    what: str, at: int, call: Callable[..., Any], args: tuple[Any, ...], index: int | None = None
) -> dict[str, Any] | None:
    """Run ``call(*args)``; if it refuses, check that it changed none of ``args``."""
    before = clone(args)
    try:
        call(*args)
    except InvalidInput as exc:
        assert clone(args) == before, f"a refused {what} changed the state"
        return {"what": what, "at": at, "event": index, "message": str(exc)}
    return None


def run_optserve(sc: Scenario, json_round_trip: bool = False) -> Outcome:
    """optserve's outcome. An event is made only if ``Schedule.check_groups`` accepts the
    groups it would leave; a refused event or step must change nothing."""
    schedule = schedules.get(sc.schedule["name"])
    config = schedule.resolve({k: v for k, v in sc.schedule.items() if k != "name"})
    groups = [{"lr": lr, **OPTIMIZER_GROUPS[sc.optimizer]} for lr in sc.lrs]
    state = schedule.start(config, groups)
    snapshots = [_snapshot(groups, state["last_lr"])]

    for step in range(sc.steps + 1):
        if step > 0:
            if json_round_trip:
                state = json.loads(json.dumps(state, allow_nan=False))
                groups = json.loads(json.dumps(groups, allow_nan=False))
            metric = metric_at(step) if sc.metrics else None
            refused = _refused("step", step, schedule.step, (config, state, groups, metric))
            if refused is not None:
                return {"snapshots": snapshots, "refused": refused}
            snapshots.append(_snapshot(groups, state["last_lr"]))
        for index, event in _events_at(sc, step):
            proposed = clone(groups)
            if event.kind == "add":
                proposed.append({**clone(OPTIMIZER_GROUPS[sc.optimizer]), **event.values})
            else:
                proposed[event.group].update(clone(event.values))
            refused = _refused(
                event.kind, step, schedule.check_groups, (config, state, proposed), index
            )
            if refused is not None:
                return {"snapshots": snapshots, "refused": refused}
            groups = proposed
    return {"snapshots": snapshots, "refused": None}


def _torch_value(key: str, value: Any) -> Any:
    return tuple(value) if key == "betas" else value


def run_torch(sc: Scenario) -> Outcome:
    """torch's outcome: ``add_param_group`` and hand edits on the live optimizer."""
    import torch

    from tests.core.torch_reference import build_scheduler

    def param() -> Any:
        return torch.zeros(1, requires_grad=True)

    with warnings.catch_warnings():
        # torch warns about call order heuristics that do not apply here.
        warnings.simplefilter("ignore", UserWarning)
        cls = getattr(torch.optim, sc.optimizer)
        defaults = {k: v for k, v in OPTIMIZER_GROUPS[sc.optimizer].items() if k != "lr"}
        optimizer = cls([{"params": [param()], "lr": lr} for lr in sc.lrs], **defaults)
        scheduler = build_scheduler(torch, optimizer, sc.schedule)
        snapshots = [_snapshot(optimizer.param_groups, scheduler.get_last_lr())]
        for step in range(sc.steps + 1):
            if step > 0:
                optimizer.step()
                try:
                    if sc.metrics:
                        scheduler.step(metric_at(step))
                    else:
                        scheduler.step()
                except Exception as exc:  # recording what torch raises
                    raised = {"step": step, "error": f"{type(exc).__name__}: {exc}"}
                    return {"snapshots": snapshots, "raised": raised}
                snapshots.append(_snapshot(optimizer.param_groups, scheduler.get_last_lr()))
            for _, event in _events_at(sc, step):
                values = {k: _torch_value(k, v) for k, v in event.values.items()}
                if event.kind == "add":
                    optimizer.add_param_group({"params": [param()], **values})
                else:
                    optimizer.param_groups[event.group].update(values)
    return {"snapshots": snapshots, "raised": None}
