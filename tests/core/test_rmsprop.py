"""RMSprop: update rule against torch, defaults, validation, state round trip."""

from __future__ import annotations

import numpy as np

from service.core import optimizers
from tests.core import optimizer_checks as checks
from tests.core.cases.rmsprop import CASES

INVALID: list[checks.Rejection] = [
    ({"lr": -0.01}, "lr", "Invalid learning rate: -0.01"),
    ({"eps": -1.0}, "eps", "Invalid epsilon value: -1.0"),
    ({"momentum": -0.9}, "momentum", "Invalid momentum value: -0.9"),
    ({"weight_decay": -0.2}, "weight_decay", "Invalid weight_decay value: -0.2"),
    ({"alpha": -0.99}, "alpha", "Invalid alpha value: -0.99"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("RMSprop")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"RMSprop": INVALID}
)


def test_optional_buffers_exist_only_for_their_variants() -> None:
    rmsprop = optimizers.get("RMSprop")
    dtype = np.dtype("float32")
    plain = rmsprop.init([(4,)], rmsprop.resolve({}), dtype)
    full = rmsprop.init([(4,)], rmsprop.resolve({"momentum": 0.9, "centered": True}), dtype)
    assert (plain.momentum_buffer, plain.grad_avg) == ([], [])
    assert len(full.momentum_buffer) == len(full.grad_avg) == 1


def test_eps_is_added_outside_the_square_root() -> None:
    rmsprop = optimizers.get("RMSprop")
    hp = rmsprop.resolve({"lr": 1.0, "alpha": 0.0, "eps": 0.5})
    state = rmsprop.init([(1,)], hp, np.dtype("float64"))
    out = [np.empty(1)]
    rmsprop.update([np.array([4.0])], state, None, hp, out)
    # alpha=0 makes the average g^2 = 16: the step is 4 / (sqrt(16) + 0.5).
    assert out[0][0] == -4.0 / (4.0 + 0.5)
