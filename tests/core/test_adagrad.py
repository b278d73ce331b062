"""Adagrad: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import optimizers
from service.core.plan import plan_from_config
from service.core.training import initial_state
from tests.core import optimizer_checks as checks
from tests.core.cases.adagrad import CASES

INVALID: list[checks.Rejection] = [
    ({"lr": -0.5}, "lr", "Invalid learning rate: -0.5"),
    ({"lr_decay": -0.1}, "lr_decay", "Invalid lr_decay value: -0.1"),
    ({"weight_decay": -1.0}, "weight_decay", "Invalid weight_decay value: -1.0"),
    (
        {"initial_accumulator_value": -0.3},
        "initial_accumulator_value",
        "Invalid initial_accumulator_value value: -0.3",
    ),
    ({"eps": -1e-10}, "eps", "Invalid epsilon value: -1e-10"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Adagrad")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Adagrad": INVALID}
)


def test_accumulator_starts_at_initial_value() -> None:
    adagrad = optimizers.get("Adagrad")
    state = adagrad.init(
        [(2, 3)], adagrad.resolve({"initial_accumulator_value": 0.25}), np.dtype("float64")
    )
    np.testing.assert_array_equal(state.sum[0], np.full((2, 3), 0.25))


def test_learning_rate_decays_as_lr_over_one_plus_step_minus_one_times_decay() -> None:
    # With a constant gradient g and a zero accumulator, step t moves the parameter by
    # -clr_t g / (sqrt(t) |g| + eps): the ratio of two steps exposes clr_t.
    adagrad = optimizers.get("Adagrad")
    hp = adagrad.resolve({"lr": 0.1, "lr_decay": 0.5, "eps": 0.0})
    state = adagrad.init([(1,)], hp, np.dtype("float64"))
    g, out = np.array([2.0]), [np.empty(1)]
    moves = []
    for _ in range(3):
        state = adagrad.update([g], state, None, hp, out)
        moves.append(-out[0][0])
    for t, move in enumerate(moves, start=1):
        expected = 0.1 / (1 + (t - 1) * 0.5) / np.sqrt(t)
        assert move == pytest.approx(expected, rel=1e-15)


def test_every_groups_accumulator_starts_at_the_constructors_value() -> None:
    # torch's Adagrad.__init__ fills state["sum"] for every group with the constructor's
    # initial_accumulator_value; a group's own value stays in the group, unread.
    plan = plan_from_config(
        {
            "optimizer": {"name": "Adagrad", "initial_accumulator_value": 0.25},
            "params": {"w": {"shape": [2, 3]}, "b": {"shape": [3]}},
            "param_groups": [{"params": ["b"], "initial_accumulator_value": 4.0}],
            "dtype": "float64",
        }
    )
    state = initial_state(plan)
    assert plan.groups[1].hparams["initial_accumulator_value"] == 4.0
    np.testing.assert_array_equal(state.opt_states[0].sum[0], np.full((2, 3), 0.25))
    np.testing.assert_array_equal(state.opt_states[1].sum[0], np.full(3, 0.25))
