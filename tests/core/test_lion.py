"""Lion: update rule against lion-pytorch, its state, arguments and validation."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import optimizers
from service.core.plan import plan_from_config
from service.core.training import initial_state
from tests.core import optimizer_checks as checks
from tests.core.cases import DTYPES
from tests.core.cases.beyond_torch import CASES as ALL_CASES
from tests.core.reference_classes import available

CASES = [
    c
    for c in ALL_CASES
    if c.config["optimizer"]["name"] == "Lion" and set(c.config) == {"optimizer", "params", "dtype"}
]
"""The cases on one group without clipping or schedule: what ``update`` alone must match."""
needs_package = pytest.mark.skipif(
    not (checks.HAVE_TORCH and available("Lion")), reason="compares against lion-pytorch"
)

INVALID: list[checks.Rejection] = [
    ({"lr": 0.0}, "lr", "Invalid learning rate: 0.0"),
    ({"lr": -1e-4}, "lr", "Invalid learning rate: -0.0001"),
    ({"betas": [1.5, 0.99]}, "betas", "Invalid beta parameter at index 0: 1.5"),
    ({"betas": [0.9, -0.1]}, "betas", "Invalid beta parameter at index 1: -0.1"),
]

test_update_matches_lion_pytorch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_momentum_matches_lion_pytorch = checks.state_matches_torch(
    CASES, scalars=(), tensors=("exp_avg",), tolerance={d: (1e-5, 1e-6) for d in DTYPES}
)
test_arguments_and_defaults_are_lion_pytorchs = checks.signatures_match_torch("Lion")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Lion": INVALID}
)


def test_every_step_moves_each_coordinate_by_exactly_lr_without_decay() -> None:
    optimizer = optimizers.get("Lion")
    hp = optimizer.resolve({"lr": 0.125})
    rng = np.random.default_rng(3)
    state = optimizer.init([(50,)], hp, np.dtype(np.float32))
    out = [np.empty(50, np.float32)]
    for _ in range(5):
        state = optimizer.update([rng.standard_normal(50).astype(np.float32)], state, None, hp, out)
        assert set(np.abs(out[0]).tolist()) == {0.125}


def test_decoupled_decay_divides_by_the_constructors_lr_in_every_group() -> None:
    config = {
        "optimizer": {
            "name": "Lion",
            "lr": 0.01,
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
        },
        "params": {"a": {"shape": [2]}, "b": {"shape": [2]}},
        "param_groups": [{"params": ["b"], "lr": 0.5}],
    }
    state = initial_state(plan_from_config(config))
    assert [s.init_lr for s in state.opt_states] == [0.01, 0.01]
