"""ASGD: update rule against torch, float32 eta and mu, averaging, validation, round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from tests.core import optimizer_checks as checks
from tests.core.cases.asgd import CASES
from tests.core.optimizer_state import STATE_TOLERANCE

DIRECT = [c for c in CASES if "schedule" not in c.config]

INVALID: list[checks.Rejection] = [
    ({"lr": -0.01}, "lr", "Invalid learning rate: -0.01"),
    ({"weight_decay": -0.5}, "weight_decay", "Invalid weight_decay value: -0.5"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(DIRECT)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(
    DIRECT, prime=60, more=20
)
# eta and mu are float32 scalars in torch: the same bits, not just close.
test_state_matches_torch = checks.state_matches_torch(
    DIRECT, scalars=("eta", "mu", "step"), tensors=("ax",), tolerance=STATE_TOLERANCE
)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("ASGD")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"ASGD": INVALID}
)


def _run(hp: dict[str, Any], steps: int, dtype: str = "float64") -> tuple[Any, np.ndarray]:
    asgd = optimizers.get("ASGD")
    resolved = asgd.resolve(hp)
    rng = np.random.default_rng(3)
    param = rng.standard_normal(4).astype(dtype)
    state = asgd.init([(4,)], resolved, np.dtype(dtype))
    out = [np.empty_like(param)]
    for _ in range(steps):
        state = asgd.update([rng.standard_normal(4).astype(dtype)], state, [param], resolved, out)
        param += out[0]
    return state, param


def test_eta_and_mu_are_float32_even_in_float64_sessions() -> None:
    lr, lambd, alpha, t0 = 0.1, 0.3, 0.7, 2.0
    state, _ = _run({"lr": lr, "lambd": lambd, "alpha": alpha, "t0": t0}, steps=5)
    exact_eta = lr / (1 + lambd * lr * 5) ** alpha
    assert state.eta == float(np.float32(exact_eta)) != exact_eta
    assert state.mu == float(np.float32(1 / (5 - t0))) != 1 / (5 - t0)


def test_average_is_the_parameter_itself_until_t0() -> None:
    # With mu = 1 the average is a copy of the new parameter; d = new - p is exact here
    # (Sterbenz), so the parameter a client rebuilds equals the average to the bit.
    state, param = _run({"lr": 0.01, "lambd": 0.0}, steps=3)
    assert state.mu == 1.0
    np.testing.assert_array_equal(state.ax[0], param)
    later, param = _run({"lr": 0.01, "lambd": 0.0, "t0": 1.0}, steps=4)
    assert later.mu == float(np.float32(1 / 3))
    assert not np.array_equal(later.ax[0], param)


def test_eta_starts_from_the_lr_of_the_first_step() -> None:
    # A schedule may rescale lr between init and the first step, as LinearLR's constructor
    # does in torch; eta is taken from the lr the first step sees.
    asgd = optimizers.get("ASGD")
    hp = asgd.resolve({"lr": 0.1, "lambd": 0.0})
    state = asgd.init([(3,)], hp, np.dtype("float64"))
    param, grad, out = np.zeros(3), np.ones(3), [np.empty(3)]
    asgd.update([grad], state, [param], {**hp, "lr": 0.025}, out)
    np.testing.assert_array_equal(out[0], -np.float32(0.025) * grad)


def test_needs_params_even_without_decay() -> None:
    asgd = optimizers.get("ASGD")
    assert asgd.needs_params(asgd.resolve({"lambd": 0.0, "weight_decay": 0.0}))


def test_fused_is_not_an_asgd_argument() -> None:
    with pytest.raises(ValueError, match="unknown argument fused;"):
        optimizers.get("ASGD").resolve({"fused": False})
