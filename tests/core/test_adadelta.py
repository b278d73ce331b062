"""Adadelta: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

from typing import Any

import pytest

from tests.core.cases import Case
from tests.core.cases.adadelta import CASES
from tests.core.optimizer_checks import (
    assert_checkpoint_continues_exactly,
    assert_rejected,
    assert_signature_matches_torch,
    assert_update_matches_torch,
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_update_matches_torch_for_200_steps(case: Case) -> None:
    assert_update_matches_torch(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_state_round_trip_continues_exactly(case: Case) -> None:
    assert_checkpoint_continues_exactly(case)


def test_arguments_and_defaults_are_torchs() -> None:
    assert_signature_matches_torch("Adadelta")


INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
    ({"rho": 1.5}, "rho", "Invalid rho value: 1.5"),
    ({"rho": -0.1}, "rho", "Invalid rho value: -0.1"),
    ({"eps": -1e-6}, "eps", "Invalid epsilon value: -1e-06"),
    ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
]


@pytest.mark.parametrize(("given", "argument", "message"), INVALID)
def test_invalid_hyperparameters_name_argument_and_value(
    given: dict[str, Any], argument: str, message: str
) -> None:
    assert_rejected("Adadelta", given, argument, message)
