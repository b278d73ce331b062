"""Adam and AdamW: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from tests.core.cases import Case
from tests.core.cases.adam import CASES
from tests.core.optimizer_checks import (
    assert_checkpoint_continues_exactly,
    assert_rejected,
    assert_signature_matches_torch,
    assert_update_matches_torch,
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_update_matches_torch_for_200_steps(case: Case) -> None:
    assert_update_matches_torch(case)


@pytest.mark.parametrize("case", CASES[:6], ids=[c.id for c in CASES[:6]])
def test_state_round_trip_continues_exactly(case: Case) -> None:
    assert_checkpoint_continues_exactly(case)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_arguments_and_defaults_are_torchs(name: str) -> None:
    assert_signature_matches_torch(name)


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


INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("Adam", {"lr": -0.1}, "lr", "Invalid learning rate: -0.1"),
    ("Adam", {"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ("Adam", {"betas": [1.0, 0.999]}, "betas", "Invalid beta parameter at index 0: 1.0"),
    ("Adam", {"betas": [0.9, -0.5]}, "betas", "Invalid beta parameter at index 1: -0.5"),
    ("Adam", {"weight_decay": -2.0}, "weight_decay", "Invalid weight_decay value: -2.0"),
    ("AdamW", {"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
    ("AdamW", {"betas": [0.9, 1.5]}, "betas", "Invalid beta parameter at index 1: 1.5"),
    ("AdamW", {"weight_decay": -0.01}, "weight_decay", "Invalid weight_decay value: -0.01"),
]


@pytest.mark.parametrize(("name", "given", "argument", "message"), INVALID)
def test_invalid_hyperparameters_name_argument_and_value(
    name: str, given: dict[str, Any], argument: str, message: str
) -> None:
    assert_rejected(name, given, argument, message)
