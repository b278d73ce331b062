"""NAdam: update rule against torch, float32 mu_product, validation, state round trip."""

from __future__ import annotations

import numpy as np

from service.core import optimizers
from tests.core import optimizer_checks as checks
from tests.core.cases.nadam import CASES
from tests.core.optimizer_state import STATE_TOLERANCE

INVALID: list[checks.Rejection] = [
    ({"lr": -0.002}, "lr", "Invalid learning rate: -0.002"),
    ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ({"betas": [1.0, 0.999]}, "betas", "Invalid beta parameter at index 0: 1.0"),
    ({"betas": [0.9, -0.1]}, "betas", "Invalid beta parameter at index 1: -0.1"),
    ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
    ({"momentum_decay": -0.004}, "momentum_decay", "Invalid momentum_decay value: -0.004"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_state_matches_torch = checks.state_matches_torch(
    CASES,
    scalars=("mu_product", "step"),
    tensors=("exp_avg", "exp_avg_sq"),
    tolerance=STATE_TOLERANCE,
)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("NAdam")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"NAdam": INVALID}
)


def test_mu_product_is_a_float32_product_even_in_float64_sessions() -> None:
    nadam = optimizers.get("NAdam")
    hp = nadam.resolve({"momentum_decay": 0.05})
    state = nadam.init([(2,)], hp, np.dtype("float64"))
    out = [np.empty(2)]
    rounded, exact = np.float32(1.0), 1.0
    for t in range(1, 6):
        state = nadam.update([np.ones(2)], state, None, hp, out)
        mu = 0.9 * (1.0 - 0.5 * 0.96 ** (t * 0.05))
        rounded, exact = rounded * np.float32(mu), exact * mu
    assert state.mu_product == float(rounded) != exact


def test_decoupled_decay_shrinks_parameters_before_the_step() -> None:
    # A zero gradient leaves the moments at zero, so the step is the decay alone.
    nadam = optimizers.get("NAdam")
    hp = nadam.resolve({"lr": 0.1, "weight_decay": 0.5, "decoupled_weight_decay": True})
    state = nadam.init([(3,)], hp, np.dtype("float64"))
    param, out = np.array([1.0, -2.0, 4.0]), [np.empty(3)]
    nadam.update([np.zeros(3)], state, [param], hp, out)
    np.testing.assert_array_equal(param + out[0], param * (1 - 0.1 * 0.5))
