"""RAdam: update rule against torch, the rectification threshold, validation, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import optimizers
from tests.core import optimizer_checks as checks
from tests.core.cases.radam import CASES

INVALID: list[checks.Rejection] = [
    ({"lr": -0.001}, "lr", "Invalid learning rate: -0.001"),
    ({"eps": -1.0}, "eps", "Invalid epsilon value: -1.0"),
    ({"betas": [-0.1, 0.999]}, "betas", "Invalid beta parameter at index 0: -0.1"),
    ({"betas": [0.9, 1.0]}, "betas", "Invalid beta parameter at index 1: 1.0"),
    ({"weight_decay": -0.01}, "weight_decay", "Invalid weight_decay value: -0.01"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
# The float32 cases (the first four) only.
test_state_matches_torch = checks.state_matches_torch(
    CASES[:4],
    scalars=("step",),
    tensors=("exp_avg", "exp_avg_sq"),
    tolerance={"float32": (1e-5, 1e-6)},
)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("RAdam")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"RAdam": INVALID}
)


def _steps(beta2: float, scale: float, count: int) -> list[float]:
    radam = optimizers.get("RAdam")
    hp = radam.resolve({"lr": 0.1, "betas": [0.9, beta2], "eps": 0.0})
    state = radam.init([(1,)], hp, np.dtype("float64"))
    out, steps = [np.empty(1)], []
    for _ in range(count):
        state = radam.update([np.array([scale])], state, None, hp, out)
        steps.append(float(out[0][0]))
    return steps


def _sma_length(beta2: float, t: int) -> float:
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * t * beta2**t / (1 - beta2**t)


@pytest.mark.parametrize("beta2", [0.999, 0.9, 0.6])
def test_adaptive_step_only_once_the_sma_length_exceeds_five(beta2: float) -> None:
    # Unrectified steps are bias-corrected momentum: proportional to the gradient.
    # Rectified ones divide by sqrt(v): with eps = 0 they do not depend on its scale.
    small, large = _steps(beta2, 1.0, 12), _steps(beta2, 8.0, 12)
    for t, (a, b) in enumerate(zip(small, large, strict=True), start=1):
        if _sma_length(beta2, t) > 5:
            assert b == pytest.approx(a, rel=1e-12), t
        else:
            assert b == pytest.approx(8 * a, rel=1e-12), t
            assert a == pytest.approx(-0.1, rel=1e-12), t
