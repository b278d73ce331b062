"""Adadelta: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

from tests.core import optimizer_checks as checks
from tests.core.cases.adadelta import CASES

INVALID: list[checks.Rejection] = [
    ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
    ({"rho": 1.5}, "rho", "Invalid rho value: 1.5"),
    ({"rho": -0.1}, "rho", "Invalid rho value: -0.1"),
    ({"eps": -1e-6}, "eps", "Invalid epsilon value: -1e-06"),
    ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Adadelta")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Adadelta": INVALID}
)
