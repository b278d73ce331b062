"""A param group with its own optimizer, in core: config, validation, edits, checkpoints.

The numbers are checked against torch in ``cases/per_group.py``; these tests cover what
parity runs do not: refusals (torch's messages, the field named), resolution against each
group's own optimizer, and state that survives a checkpoint and an added group.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.group_changes import add_group, apply_edit, plan_edit
from service.core.optimizers import get
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state, state_from_flat, state_to_flat
from tests.core.cases.per_group import MUON_ADAMW


def _config(**changes: Any) -> dict[str, Any]:
    config = copy.deepcopy(MUON_ADAMW)
    config.update(changes)
    return config


def test_each_group_resolves_against_its_own_optimizer() -> None:
    plan = plan_from_config(_config())
    default, weights, scale = plan.groups
    assert [g.optimizer.name for g in plan.groups] == ["AdamW", "Muon", "AdamW"]
    given = {k: v for k, v in MUON_ADAMW["param_groups"][0]["optimizer"].items() if k != "name"}
    constructor = get("Muon").resolve(given)
    assert weights.constructor == constructor
    assert weights.hparams == get("Muon").resolve({**constructor, "nesterov": False})
    assert weights.hparams["ns_steps"] == 4 and weights.hparams["eps"] == 1e-7
    assert "betas" not in weights.hparams and default.hparams["betas"] == (0.85, 0.98)
    assert scale.hparams["lr"] == 1e-2 and scale.hparams["betas"] == (0.85, 0.98)


def test_the_resolved_config_round_trips() -> None:
    plan = plan_from_config(_config())
    described = plan.describe()
    entry = described["param_groups"][0]
    assert entry["optimizer"]["name"] == "Muon" and entry["optimizer"]["ns_steps"] == 4
    assert entry["nesterov"] is False
    assert "optimizer" not in described["param_groups"][1]
    again = plan_from_config(described)
    assert [g.hparams for g in again.groups] == [g.hparams for g in plan.groups]
    assert [g.optimizer for g in again.groups] == [g.optimizer for g in plan.groups]


@pytest.mark.parametrize(
    ("group", "field", "message"),
    [
        ({"optimizer": {"name": "Muon", "lr": -1.0}}, "param_groups[0].optimizer.lr", "-1.0"),
        ({"optimizer": {"name": "NoSuch"}}, "param_groups[0].optimizer.name", "NoSuch"),
        ({"optimizer": {"lr": 0.1}}, "param_groups[0].optimizer.name", "string"),
        ({"optimizer": "Muon"}, "param_groups[0].optimizer", "object"),
        ({"optimizer": {"name": "Muon"}, "betas": [0.9, 0.9]}, "param_groups[0].betas", "betas"),
        ({"optimizer": {"name": "Muon"}, "momentum": -0.5}, "param_groups[0].momentum", "-0.5"),
        ({"optimizer": {"name": "LBFGS"}}, "param_groups[0].optimizer.name", "LBFGS"),
    ],
)
def test_a_bad_group_optimizer_names_its_field(
    group: dict[str, Any], field: str, message: str
) -> None:
    config = {
        "optimizer": {"name": "AdamW"},
        "params": {"w": {"shape": [3, 2]}, "b": {"shape": [2]}},
        "param_groups": [{"params": ["w"], **group}],
    }
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == field
    assert message in str(caught.value)


def test_muon_on_a_vector_is_refused_with_torchs_message_naming_the_group() -> None:
    config = _config()
    config["param_groups"][0]["params"] = ["w1", "b1"]
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == "param_groups[0].params"
    assert "Muon only supports 2D parameters whereas we found a parameter with size: [6]" in str(
        caught.value
    )


def test_lbfgs_cannot_be_the_default_beside_a_group_optimizer() -> None:
    config = _config(optimizer={"name": "LBFGS"})
    with pytest.raises(InvalidHyperparameter, match="LBFGS"):
        plan_from_config(config)


def test_one_cycle_needs_momentum_or_betas_in_every_group() -> None:
    config = _config(schedule={"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 10})
    config["param_groups"][1]["optimizer"] = {"name": "Adagrad"}
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == "schedule.cycle_momentum"


def test_cyclic_momentum_moves_momentum_for_muon_and_beta1_for_adamw() -> None:
    schedule = {"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 10}
    plan = plan_from_config(_config(schedule=schedule))
    state = initial_state(plan)
    default, weights, _ = state.groups
    assert weights["momentum"] == 0.95 and default["betas"][0] == 0.95
    assert default["betas"][1] == 0.98 and "betas" not in weights


def _step(plan: Any, state: Any, rng: np.random.Generator) -> list[np.ndarray]:
    grads = [rng.standard_normal(t.shape).astype(plan.dtype) for t in plan.tensors]
    params = [np.ones(t.shape, plan.dtype) for t in plan.tensors]
    out = [np.empty(t.shape, plan.dtype) for t in plan.tensors]
    apply_step(plan, state, grads, params, out)
    return out


def test_state_round_trips_through_a_checkpoint_and_steps_the_same() -> None:
    plan = plan_from_config(_config(dtype="float64"))
    state = initial_state(plan)
    for seed in range(3):
        _step(plan, state, np.random.default_rng(seed))
    arrays, meta = state_to_flat(plan, state)
    restored = state_from_flat(plan, {k: a.copy() for k, a in arrays.items()}, meta)
    a = _step(plan, state, np.random.default_rng(9))
    b = _step(plan, restored, np.random.default_rng(9))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_an_edit_validates_against_the_groups_own_optimizer() -> None:
    plan = plan_from_config(_config())
    state = initial_state(plan)
    edit = plan_edit(plan, state, 1, {"ns_steps": 3, "lr": 0.01})
    apply_edit(plan, state, edit)
    assert state.groups[1]["ns_steps"] == 3
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_edit(plan, state, 1, {"betas": [0.9, 0.99]})
    assert caught.value.argument == "param_groups[1].betas"
    assert "Muon has no hyperparameter 'betas'" in str(caught.value)
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_edit(plan, state, 0, {"ns_steps": 3})
    assert "AdamW has no hyperparameter 'ns_steps'" in str(caught.value)


def test_a_groups_optimizer_cannot_change() -> None:
    plan = plan_from_config(_config())
    state = initial_state(plan)
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_edit(plan, state, 1, {"optimizer": {"name": "AdamW"}})
    assert caught.value.argument == "param_groups[1].optimizer"
    assert "cannot change" in str(caught.value)


def test_an_added_group_may_name_its_own_optimizer() -> None:
    config = _config(dtype="float64")
    before = plan_from_config(config)
    state = initial_state(before)
    _step(before, state, np.random.default_rng(0))
    extended = copy.deepcopy(config)
    extended["params"]["w3"] = {"shape": [2, 3]}
    entry = {"params": ["w3"], "optimizer": {"name": "Muon", "lr": 0.05}}
    extended["param_groups"].append(entry)
    after = plan_from_config(extended, schedule_groups=len(state.groups))
    add_group(before, after, state)
    assert after.groups[-1].optimizer.name == "Muon"
    assert state.groups[-1]["lr"] == 0.05 and "betas" not in state.groups[-1]
    _step(after, state, np.random.default_rng(1))
    (buffer,) = state.opt_states[-1].momentum_buffer
    assert buffer.shape == (2, 3) and np.any(buffer != 0)


def test_an_added_group_cannot_change_an_existing_groups_optimizer() -> None:
    config = _config()
    before = plan_from_config(config)
    state = initial_state(before)
    extended = copy.deepcopy(config)
    extended["params"]["w3"] = {"shape": [2, 3]}
    extended["param_groups"][0] = {"params": ["w1", "w2"], "optimizer": {"name": "AdamW"}}
    extended["param_groups"].append({"params": ["w3"]})
    after = plan_from_config(extended, schedule_groups=len(state.groups))
    with pytest.raises(InvalidInput, match="optimizer"):
        add_group(before, after, state)
