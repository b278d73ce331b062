"""Adding a param group to a running session (torch's ``add_param_group``) in core.

A plan rebuilt from the config extended by the new tensors and one more ``param_groups``
entry lines up with a state extended by ``add_group``; steps then run on every group as
torch's do, and whatever the schedule could not step on is refused before anything
changes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.group_changes import add_group, check_groups
from service.core.plan import Plan, plan_from_config
from service.core.training import (
    TrainState,
    apply_step,
    initial_state,
    state_from_flat,
    state_to_flat,
)

HAVE_TORCH = importlib.util.find_spec("torch") is not None
PARAMS = {"w": {"shape": [3, 2]}, "v": {"shape": [4]}}
NEW = {"u": {"shape": [2, 2]}}


def _config(optimizer: dict[str, Any], schedule: Any = None, **more: Any) -> dict[str, Any]:
    config = {"optimizer": optimizer, "params": dict(PARAMS), "dtype": "float64", **more}
    if schedule is not None:
        config["schedule"] = schedule
    return config


def _extended(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The config as the session layer rebuilds it after ``add_param_group``."""
    extended = copy.deepcopy(config)
    extended["params"] = {**config["params"], **NEW}
    entry = {"params": list(NEW), **overrides}
    extended["param_groups"] = [*config.get("param_groups", []), entry]
    return extended


def _snapshot(plan: Plan, state: TrainState) -> Any:
    """Everything a state holds, copied: its arrays and its JSON rest."""
    arrays, meta = state_to_flat(plan, state)
    return {k: a.copy() for k, a in arrays.items()}, json.dumps(meta, sort_keys=True)


def _assert_unchanged(before: Any, plan: Plan, state: TrainState) -> None:
    arrays, meta = _snapshot(plan, state)
    assert meta == before[1]
    assert arrays.keys() == before[0].keys()
    for k, a in arrays.items():
        np.testing.assert_array_equal(a, before[0][k])


def _steps(
    plan: Plan, state: TrainState, params: list[np.ndarray], grads: list[list[np.ndarray]]
) -> None:
    out = [np.empty_like(p) for p in params]
    for g in grads:
        apply_step(plan, state, [x.copy() for x in g], params, out)
        for p, d in zip(params, out, strict=True):
            p += d


SGD = {"name": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
ADAM = {"name": "Adam", "lr": 0.01, "betas": [0.8, 0.99]}
CASES = [
    (
        "sgd-steplr",
        SGD,
        {"name": "StepLR", "step_size": 3, "gamma": 0.5},
        {"lr": 0.05, "momentum": 0.5},
    ),
    ("sgd-defaults-only", SGD, {"name": "ExponentialLR", "gamma": 0.9}, {}),
    (
        "adam-chained",
        ADAM,
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "LinearLR", "start_factor": 0.25, "total_iters": 6},
                {"name": "ExponentialLR", "gamma": 0.95},
            ],
        },
        {"lr": 0.003, "betas": [0.5, 0.9]},
    ),
    (
        "sgd-plateau",
        SGD,
        {"name": "ReduceLROnPlateau", "factor": 0.5, "patience": 0, "min_lr": 0.004},
        {"lr": 0.2},
    ),
]


def _losses(n: int) -> list[float]:
    return [1.0 / (1 + min(i, 3)) for i in range(n)]


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="compares with torch's add_param_group")
@pytest.mark.parametrize(
    ("optimizer", "schedule", "overrides"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_training_with_an_added_group_matches_torch(
    optimizer: dict[str, Any], schedule: dict[str, Any], overrides: dict[str, Any]
) -> None:
    import torch

    from tests.core.torch_reference import build_scheduler

    before_steps, after_steps = 4, 8
    rng = np.random.default_rng(7)
    start = {n: rng.standard_normal(s["shape"]) for n, s in {**PARAMS, **NEW}.items()}
    grads = [
        {n: rng.standard_normal(s["shape"]) for n, s in {**PARAMS, **NEW}.items()}
        for _ in range(before_steps + after_steps)
    ]
    losses = _losses(before_steps + after_steps)

    # optserve: the schedule steps after every optimizer step, with the loss as metric.
    config = _config(optimizer, schedule)
    before = plan_from_config(config)
    state = initial_state(before)
    params = [start[n].copy() for n in PARAMS]
    out = [np.empty_like(p) for p in params]
    for i in range(before_steps):
        apply_step(before, state, [grads[i][n].copy() for n in PARAMS], params, out, losses[i])
        for p, d in zip(params, out, strict=True):
            p += d
    after = plan_from_config(_extended(config, **overrides), schedule_groups=len(state.groups))
    add_group(before, after, state)
    params += [start[n].copy() for n in NEW]
    out = [np.empty_like(p) for p in params]
    lrs = []
    for i in range(before_steps, before_steps + after_steps):
        names = [t.name for t in after.tensors]
        apply_step(after, state, [grads[i][n].copy() for n in names], params, out, losses[i])
        for p, d in zip(params, out, strict=True):
            p += d
        lrs.append([g["lr"] for g in state.groups])

    # torch: the same loop, add_param_group after the same steps.
    tensors = {n: torch.tensor(v, requires_grad=True) for n, v in start.items()}
    opt_kwargs = {
        k: tuple(v) if isinstance(v, list) else v for k, v in optimizer.items() if k != "name"
    }
    opt = getattr(torch.optim, optimizer["name"])([tensors[n] for n in PARAMS], **opt_kwargs)
    sched = build_scheduler(torch, opt, schedule)
    torch_lrs = []
    for i in range(before_steps + after_steps):
        if i == before_steps:
            extra = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
            opt.add_param_group({"params": [tensors[n] for n in NEW], **extra})
        for n, t in tensors.items():
            t.grad = torch.tensor(grads[i][n])
        opt.step()
        sched.step(losses[i]) if schedule["name"] == "ReduceLROnPlateau" else sched.step()
        if i >= before_steps:
            torch_lrs.append([g["lr"] for g in opt.param_groups])

    assert lrs == torch_lrs
    for spec, p in zip(after.tensors, params, strict=True):
        np.testing.assert_allclose(p, tensors[spec.name].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_added_group_takes_the_defaults_and_no_schedule_keys() -> None:
    config = _config(
        SGD, {"name": "StepLR", "step_size": 2}, param_groups=[{"params": ["v"], "lr": 0.3}]
    )
    before = plan_from_config(config)
    state = initial_state(before)
    after = plan_from_config(_extended(config, momentum=0.5), schedule_groups=2)
    add_group(before, after, state)
    assert len(state.groups) == len(state.opt_states) == 3
    assert state.groups[-1] == dict(after.groups[-1].hparams)
    assert state.groups[-1]["lr"] == SGD["lr"] and state.groups[-1]["momentum"] == 0.5
    assert "initial_lr" not in state.groups[-1] and "initial_lr" in state.groups[0]
    # Default group first, then the entries in order: the added group is last, on "u".
    assert [g.indices for g in after.groups] == [(0,), (1,), (2,)]


def test_added_group_is_last_when_there_is_no_default_group() -> None:
    config = _config(SGD, param_groups=[{"params": ["v", "w"], "lr": 0.3}])
    before = plan_from_config(config)
    assert len(before.groups) == 1
    state = initial_state(before)
    after = plan_from_config(_extended(config, lr=0.02))
    add_group(before, after, state)
    assert [g.indices for g in after.groups] == [(1, 0), (2,)]
    assert [g["lr"] for g in state.groups] == [0.3, 0.02]


def test_state_with_an_added_group_round_trips_through_a_checkpoint() -> None:
    config = _config(ADAM, {"name": "CosineAnnealingLR", "T_max": 50})
    before = plan_from_config(config)
    state = initial_state(before)
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s["shape"]) for s in PARAMS.values()]
    _steps(
        before,
        state,
        params,
        [[rng.standard_normal(s["shape"]) for s in PARAMS.values()] for _ in range(3)],
    )
    after = plan_from_config(_extended(config), schedule_groups=1)
    add_group(before, after, state)
    params.append(rng.standard_normal(NEW["u"]["shape"]))
    grads = [[rng.standard_normal(t.shape) for t in after.tensors] for _ in range(4)]
    _steps(after, state, params, grads[:2])
    arrays, meta = state_to_flat(after, state)
    restored = state_from_flat(after, arrays, json.loads(json.dumps(meta)))
    a, b = [p.copy() for p in params], [p.copy() for p in params]
    _steps(after, state, a, grads[2:])
    _steps(after, restored, b, grads[2:])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("schedule", "says"),
    [
        ({"name": "CyclicLR", "base_lr": [0.01, 0.02], "max_lr": 0.1}, "CyclicLR cannot step 3"),
        (
            {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 20},
            "OneCycleLR cannot step param_groups[2]",
        ),
        (
            {"name": "CosineAnnealingWarmRestarts", "T_0": 4},
            "CosineAnnealingWarmRestarts cannot step",
        ),
        (
            {"name": "ReduceLROnPlateau", "min_lr": [0.0, 0.001]},
            "ReduceLROnPlateau cannot reduce 3 param groups",
        ),
        (
            {
                "name": "SequentialLR",
                "schedulers": [
                    {"name": "ConstantLR", "total_iters": 2},
                    {"name": "StepLR", "step_size": 2},
                ],
                "milestones": [1],
            },
            "SequentialLR cannot switch to StepLR at milestone 1",
        ),
    ],
    ids=["cyclic", "onecycle", "warmrestarts", "plateau", "sequential-milestone"],
)
def test_adding_a_group_torch_cannot_step_is_refused_and_changes_nothing(
    schedule: dict[str, Any], says: str
) -> None:
    config = _config(
        SGD, {**schedule, "interval": "manual"}, param_groups=[{"params": ["v"], "lr": 0.3}]
    )
    before = plan_from_config(config)
    state = initial_state(before)
    snapshot = _snapshot(before, state)
    after = plan_from_config(_extended(config), schedule_groups=2)
    with pytest.raises(InvalidInput, match=r"add_param_group") as refused:
        add_group(before, after, state)
    assert says in str(refused.value)
    _assert_unchanged(snapshot, before, state)


def test_per_group_schedule_arguments_are_checked_against_the_groups_the_schedule_knew() -> None:
    config = _config(
        SGD, {"name": "ReduceLROnPlateau", "min_lr": [0.0, 0.001]}, param_groups=[{"params": ["v"]}]
    )
    with pytest.raises(InvalidHyperparameter, match="expected 3 min_lrs"):
        plan_from_config(_extended(config))
    assert len(plan_from_config(_extended(config), schedule_groups=2).groups) == 3


@pytest.mark.parametrize(
    "change",
    ["two-groups", "existing-tensor", "schedule", "tensor-order"],
)
def test_a_plan_that_is_not_one_group_more_is_refused(change: str) -> None:
    config = _config(SGD, {"name": "StepLR", "step_size": 2})
    before = plan_from_config(config)
    state = initial_state(before)
    snapshot = _snapshot(before, state)
    extended = _extended(config)
    if change == "two-groups":
        extended["params"]["z"] = {"shape": [1]}
        extended["param_groups"].append({"params": ["z"]})
    elif change == "existing-tensor":
        extended["param_groups"][-1]["params"].append("v")
    elif change == "schedule":
        extended["schedule"] = {"name": "StepLR", "step_size": 3}
    else:
        extended["params"] = {**NEW, **PARAMS}
    with pytest.raises(InvalidInput, match="cannot add this param group"):
        add_group(before, plan_from_config(extended), state)
    _assert_unchanged(snapshot, before, state)


def test_an_edit_is_checked_without_changing_anything() -> None:
    config = _config(SGD, {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 10})
    plan = plan_from_config(config)
    state = initial_state(plan)
    snapshot = _snapshot(plan, state)
    edited = copy.deepcopy(state.groups)
    edited[0]["lr"] = 0.9
    check_groups(plan, state, edited)  # torch's OneCycleLR steps on from its own bounds
    _assert_unchanged(snapshot, plan, state)
    with pytest.raises(InvalidInput, match="add_param_group"):
        check_groups(plan, state, [*edited, dict(plan.groups[0].hparams)])
    _assert_unchanged(snapshot, plan, state)
