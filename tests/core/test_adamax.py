"""Adamax: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

from tests.core import optimizer_checks as checks
from tests.core.cases.adamax import CASES

INVALID: list[checks.Rejection] = [
    ({"lr": -0.002}, "lr", "Invalid learning rate: -0.002"),
    ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ({"betas": [-0.1, 0.999]}, "betas", "Invalid beta parameter at index 0: -0.1"),
    ({"betas": [0.9, 1.0]}, "betas", "Invalid beta parameter at index 1: 1.0"),
    ({"weight_decay": -0.5}, "weight_decay", "Invalid weight_decay value: -0.5"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Adamax")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Adamax": INVALID}
)
