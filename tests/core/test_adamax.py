"""Adamax: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

from typing import Any

import pytest

from tests.core.cases import Case
from tests.core.cases.adamax import CASES
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
    assert_signature_matches_torch("Adamax")


INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"lr": -0.002}, "lr", "Invalid learning rate: -0.002"),
    ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ({"betas": [-0.1, 0.999]}, "betas", "Invalid beta parameter at index 0: -0.1"),
    ({"betas": [0.9, 1.0]}, "betas", "Invalid beta parameter at index 1: 1.0"),
    ({"weight_decay": -0.5}, "weight_decay", "Invalid weight_decay value: -0.5"),
]


@pytest.mark.parametrize(("given", "argument", "message"), INVALID)
def test_invalid_hyperparameters_name_argument_and_value(
    given: dict[str, Any], argument: str, message: str
) -> None:
    assert_rejected("Adamax", given, argument, message)
