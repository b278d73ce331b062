"""Rprop: update rule against torch, step-size adaptation, validation, state round trip."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core import optimizers
from tests.core import optimizer_checks as checks
from tests.core.cases.rprop import CASES

DIRECT = [c for c in CASES if "schedule" not in c.config]

INVALID: list[checks.Rejection] = [
    ({"lr": -0.01}, "lr", "Invalid learning rate: -0.01"),
    ({"etas": [1.0, 1.2]}, "etas", "Invalid eta values: 1.0, 1.2"),
    ({"etas": [0.5, 1.0]}, "etas", "Invalid eta values: 0.5, 1.0"),
    ({"etas": [0.0, 1.2]}, "etas", "Invalid eta values: 0.0, 1.2"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(DIRECT)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(DIRECT)
test_state_matches_torch_to_the_bit = checks.state_matches_torch(
    DIRECT, scalars=("step",), tensors=("prev", "step_size"), tolerance=None
)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Rprop")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Rprop": INVALID}
)


def _rprop(**given: Any) -> tuple[Any, dict[str, Any], Any]:
    rprop = optimizers.get("Rprop")
    hp = rprop.resolve(given)
    return rprop, hp, rprop.init([(2,)], hp, np.dtype("float64"))


def test_step_sizes_start_from_the_lr_of_the_first_step() -> None:
    # A schedule may rescale lr between init and the first step; later changes of lr
    # no longer matter, the step sizes have taken over.
    rprop, hp, state = _rprop(lr=0.1)
    out = [np.empty(2)]
    rprop.update([np.array([1.0, -2.0])], state, None, {**hp, "lr": 0.04}, out)
    np.testing.assert_array_equal(out[0], [-0.04, 0.04])
    rprop.update([np.array([1.0, -2.0])], state, None, {**hp, "lr": 5.0}, out)
    np.testing.assert_array_equal(out[0], [-0.04 * 1.2, 0.04 * 1.2])


def test_a_sign_flip_shrinks_the_step_and_skips_one_move() -> None:
    rprop, hp, state = _rprop(lr=0.1, etas=[0.25, 2.0])
    out = [np.empty(2)]
    moves = []
    for g in ([1.0, 1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -1.0]):
        state = rprop.update([np.array(g)], state, None, hp, out)
        moves.append(out[0].copy())
    # Second element: flip -> no move (step size 0.1 * 0.25); the stored gradient is
    # zeroed, so the next step neither grows nor shrinks; then it grows again.
    assert [m[1] for m in moves] == [-0.1, 0.0, 0.1 * 0.25, 0.1 * 0.25 * 2.0]
    assert [m[0] for m in moves] == [-0.1, -0.2, -0.4, -0.8]


def test_step_sizes_are_clamped() -> None:
    rprop, hp, state = _rprop(lr=0.1, etas=[0.5, 3.0], step_sizes=[0.08, 0.5])
    out = [np.empty(2)]
    sizes = []
    for g in ([1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, 1.0]):
        state = rprop.update([np.array(g)], state, None, hp, out)
        sizes.append(state.step_size[0].tolist())
    # Up to the cap, down to the floor; after a flip the element neither grows nor shrinks.
    assert sizes == [[0.1, 0.1], [0.1 * 3.0, 0.08], [0.5, 0.08], [0.5, 0.08 * 3.0]]


def test_maximize_climbs() -> None:
    rprop, hp, state = _rprop(lr=0.1, maximize=True)
    out = [np.empty(2)]
    rprop.update([np.array([3.0, -0.5])], state, None, hp, out)
    np.testing.assert_array_equal(out[0], [0.1, -0.1])
