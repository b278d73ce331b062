"""The training step around the optimizers: validation first, skip, cadence, checkpoints."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.optimizers import all_optimizers
from service.core.plan import plan_from_config
from service.core.training import (
    TrainState,
    apply_step,
    current_lrs,
    initial_state,
    preview,
    schedule_step,
    state_from_flat,
    state_to_flat,
)

PARAMS = {"w": {"shape": [6, 4]}, "v": {"shape": [3, 5]}}
EXTRA: dict[str, dict[str, Any]] = {"LBFGS": {"max_iter": 1}, "CAME": {"lr": 1e-3}}
"""Arguments an optimizer needs beyond its defaults (CAME has no default lr)."""


def _config(name: str, **more: Any) -> dict[str, Any]:
    return {
        "optimizer": {"name": name, **EXTRA.get(name, {})},
        "params": PARAMS,
        "dtype": "float64",
        **more,
    }


def _grads(rng: np.random.Generator, dtype: Any = np.float64) -> list[np.ndarray]:
    return [rng.standard_normal(tuple(s["shape"])).astype(dtype) for s in PARAMS.values()]


def _run(plan: Any, state: TrainState, params: list[np.ndarray], seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    out = [np.empty_like(p) for p in params]
    for _ in range(n):
        apply_step(plan, state, _grads(rng), params, out)
        for p, d in zip(params, out, strict=True):
            p += d


def _checkpoint_copy(plan: Any, state: TrainState) -> TrainState:
    """Serialize as a checkpoint would: array bytes and JSON text, nothing shared."""
    arrays, meta = state_to_flat(plan, state)
    raw = {k: (a.tobytes(), a.dtype.str, a.shape) for k, a in arrays.items()}
    rebuilt = {k: np.frombuffer(b, dtype=d).reshape(shape) for k, (b, d, shape) in raw.items()}
    return state_from_flat(plan, rebuilt, json.loads(json.dumps(meta)))


@pytest.mark.parametrize("name", [o.name for o in all_optimizers()])
def test_checkpoint_round_trip_continues_bit_exactly(name: str) -> None:
    config = _config(name, schedule={"name": "ExponentialLR", "gamma": 0.97})
    plan = plan_from_config(config)
    state = initial_state(plan)
    params = [np.random.default_rng(1).standard_normal(t.shape) for t in plan.tensors]
    _run(plan, state, params, seed=2, n=7)
    restored = _checkpoint_copy(plan, state)
    params_copy = [p.copy() for p in params]
    _run(plan, state, params, seed=3, n=9)
    _run(plan, restored, params_copy, seed=3, n=9)
    for a, b in zip(params, params_copy, strict=True):
        assert a.tobytes() == b.tobytes()
    assert current_lrs(state) == current_lrs(restored)
    assert state.step == restored.step == 16


def test_rejected_step_changes_nothing() -> None:
    plan = plan_from_config(_config("Adam", nonfinite="error"))
    state = initial_state(plan)
    params = [np.ones(t.shape) for t in plan.tensors]
    _run(plan, state, params, seed=0, n=3)
    before = _checkpoint_copy(plan, state)
    bad = _grads(np.random.default_rng(5))
    bad[1][0, 0] = np.nan
    out = [np.zeros_like(p) for p in params]
    with pytest.raises(InvalidInput, match="'v'"):
        apply_step(plan, state, bad, params, out)
    wrong_shape = [np.zeros((6, 4)), np.zeros((5, 3))]
    with pytest.raises(InvalidInput, match="shape"):
        apply_step(plan, state, wrong_shape, params, out)
    arrays_now, meta_now = state_to_flat(plan, state)
    arrays_before, meta_before = state_to_flat(plan, before)
    assert meta_now == meta_before
    for key, value in arrays_before.items():
        assert arrays_now[key].tobytes() == value.tobytes()


def test_nonfinite_skip_counts_and_does_not_advance() -> None:
    plan = plan_from_config(_config("SGD", nonfinite="skip"))
    state = initial_state(plan)
    grads = _grads(np.random.default_rng(0))
    grads[0][1, 1] = np.inf
    out = [np.ones(t.shape) for t in plan.tensors]
    outcome = apply_step(plan, state, grads, None, out)
    assert not outcome.applied and outcome.reason is not None and "'w'" in outcome.reason
    assert state.step == 0 and state.skipped == 1
    assert all(not d.any() for d in out)


def test_params_required_when_update_reads_them() -> None:
    plan = plan_from_config(_config("SGD", optimizer={"name": "SGD", "weight_decay": 0.1}))
    assert plan.needs_params
    with pytest.raises(InvalidInput, match="params"):
        apply_step(plan, initial_state(plan), _grads(np.random.default_rng(0)), None, [])


def test_schedule_every_and_manual() -> None:
    every = plan_from_config(
        _config("SGD", schedule={"name": "StepLR", "step_size": 1, "gamma": 0.5, "every": 3})
    )
    assert [lrs[0] for lrs in preview(every, 7)] == [1e-3] * 3 + [5e-4] * 3 + [2.5e-4]
    state = initial_state(every)
    _run(every, state, [np.zeros(t.shape) for t in every.tensors], seed=0, n=4)
    assert current_lrs(state) == [5e-4]
    with pytest.raises(InvalidInput, match="manual"):
        schedule_step(every, state, None)

    manual = plan_from_config(
        _config("SGD", schedule={"name": "StepLR", "step_size": 1, "interval": "manual"})
    )
    state = initial_state(manual)
    _run(manual, state, [np.zeros(t.shape) for t in manual.tensors], seed=0, n=5)
    assert current_lrs(state) == [1e-3]
    schedule_step(manual, state, None)
    assert current_lrs(state) == pytest.approx([1e-4])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (_config("SGD", dtype="float16"), "dtype"),
        (_config("Nope"), "optimizer.name"),
        (_config("SGD", optimizer={"name": "SGD", "lr": -1.0}), "optimizer.lr"),
        (_config("SGD", optimizer={"name": "SGD", "bogus": 1}), "optimizer.bogus"),
        (_config("SGD", params={"bad name": {"shape": [2]}}), "params.bad name"),
        (_config("SGD", params={"w": {"shape": [-1]}}), "params.w.shape"),
        (_config("SGD", param_groups=[{"params": ["zzz"]}]), "param_groups[0].params"),
        (_config("SGD", param_groups=[{"params": ["w"], "lr": -2}]), "param_groups[0].lr"),
        (
            _config("SGD", param_groups=[{"params": ["w"]}, {"params": ["w"]}]),
            "param_groups[1].params",
        ),
        (_config("SGD", clip_grad_norm={"norm_type": 2}), "clip_grad_norm.max_norm"),
        (_config("SGD", schedule={"name": "StepLR", "step_size": 1, "every": 0}), "schedule.every"),
        (_config("SGD", nonfinite="ignore"), "nonfinite"),
        (_config("SGD", surprise=True), "surprise"),
    ],
)
def test_invalid_config_names_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        plan_from_config(config)
    assert info.value.argument == field


def test_describe_round_trips_through_plan_from_config() -> None:
    config = _config(
        "SGD",
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        param_groups=[{"params": ["v"], "lr": 0.01}],
        clip_grad_norm={"max_norm": 1.0},
        schedule={"name": "StepLR", "step_size": 3},
    )
    plan = plan_from_config(config)
    again = plan_from_config(plan.describe())
    assert again.describe() == plan.describe()
    assert plan.describe()["optimizer"]["name"] == "SGD"
    assert plan.resolved_groups()[1]["lr"] == 0.01
