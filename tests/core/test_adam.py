"""Adam and AdamW: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from tests.core import optimizer_checks as checks
from tests.core.cases.adam import CASES

INVALID: dict[str, list[checks.Rejection]] = {
    "Adam": [
        ({"lr": -0.1}, "lr", "Invalid learning rate: -0.1"),
        ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
        ({"betas": [1.0, 0.999]}, "betas", "Invalid beta parameter at index 0: 1.0"),
        ({"betas": [0.9, -0.5]}, "betas", "Invalid beta parameter at index 1: -0.5"),
        ({"weight_decay": -2.0}, "weight_decay", "Invalid weight_decay value: -2.0"),
    ],
    "AdamW": [
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"betas": [0.9, 1.5]}, "betas", "Invalid beta parameter at index 1: 1.5"),
        ({"weight_decay": -0.01}, "weight_decay", "Invalid weight_decay value: -0.01"),
    ],
}

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES[:6])
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Adam", "AdamW")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    INVALID
)


def test_adamw_decays_by_default_and_is_always_decoupled() -> None:
    adamw = optimizers.get("adamw")
    hp = adamw.resolve({})
    assert hp["weight_decay"] == 1e-2
    assert adamw.needs_params(hp)
    with pytest.raises(InvalidHyperparameter) as caught:
        adamw.resolve({"decoupled_weight_decay": False})
    assert caught.value.argument == "decoupled_weight_decay"


def test_amsgrad_state_is_kept_only_when_asked_for() -> None:
    adam = optimizers.get("Adam")
    plain = adam.init([(3,)], adam.resolve({}), np.dtype("float32"))
    ams = adam.init([(3,)], adam.resolve({"amsgrad": True}), np.dtype("float32"))
    assert plain.max_exp_avg_sq == []
    assert [a.shape for a in ams.max_exp_avg_sq] == [(3,)]
