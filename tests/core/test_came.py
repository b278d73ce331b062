"""CAME: update rule against came-pytorch, its factored state, arguments and validation."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.state import from_flat, to_flat
from tests.core import optimizer_checks as checks
from tests.core.cases import DTYPES, Case, case_ids
from tests.core.cases.beyond_torch import CASES as ALL_CASES
from tests.core.optimizer_state import optserve_state, torch_state
from tests.core.reference_classes import config_available

CASES = [
    c
    for c in ALL_CASES
    if c.config["optimizer"]["name"] == "CAME" and set(c.config) == {"optimizer", "params", "dtype"}
]
"""The cases on one group without clipping or schedule: what ``update`` alone must match."""

INVALID: list[checks.Rejection] = [
    ({"lr": 0.0}, "lr", "Invalid learning rate: 0.0"),
    ({"lr": -1e-3}, "lr", "Invalid learning rate: -0.001"),
    ({"lr": 1e-3, "betas": [0.9, 1.5, 0.99]}, "betas", "Invalid beta parameter at index 1: 1.5"),
    ({"lr": 1e-3, "betas": [-0.1, 0.9, 0.99]}, "betas", "Invalid beta parameter at index 0: -0.1"),
]
BEYOND_PACKAGE: list[checks.Rejection] = [
    # The package takes these, and its steps then turn NaN or stop clipping.
    ({"lr": 1e-3, "eps": [-1.0, 1e-16]}, "eps", "Invalid epsilon value: [-1.0, 1e-16]"),
    ({"lr": 1e-3, "clip_threshold": 0.0}, "clip_threshold", "Invalid clip_threshold value: 0.0"),
    ({"lr": 1e-3, "clip_threshold": -1.0}, "clip_threshold", "Invalid clip_threshold value: -1.0"),
    ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
]
test_values_the_package_takes_and_runs_on_meaninglessly_are_refused = checks.refused_beyond_package(
    "CAME", BEYOND_PACKAGE
)

test_update_matches_came_pytorch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_momentum_and_step_match_came_pytorch = checks.state_matches_torch(
    CASES,
    scalars=("step",),
    tensors=("exp_avg",),
    tolerance={d: (1e-5, 1e-6) for d in DTYPES},
)
test_arguments_and_defaults_are_came_pytorchs = checks.signatures_match_torch("CAME")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"CAME": INVALID}
)


def test_lr_is_required_as_the_package_has_no_default() -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get("CAME").resolve({}, where="optimizer.")
    assert caught.value.argument == "optimizer.lr"


def test_betas_need_three_entries() -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get("CAME").resolve({"lr": 1e-3, "betas": [0.9, 0.99]}, where="optimizer.")
    assert caught.value.argument == "optimizer.betas"


def test_matrices_keep_row_and_column_factors_and_vectors_a_full_moment() -> None:
    optimizer = optimizers.get("CAME")
    hp = optimizer.resolve({"lr": 1e-3})
    state = optimizer.init([(3, 4, 5), (4,), (6, 2)], hp, np.dtype(np.float32))
    assert [a.shape for a in state.exp_avg_sq_row] == [(3, 4), (6,)]
    assert [a.shape for a in state.exp_avg_sq_col] == [(3, 5), (2,)]
    assert [a.shape for a in state.exp_avg_res_row] == [(3, 4), (6,)]
    assert [a.shape for a in state.exp_avg_sq] == [(4,)]
    arrays, scalars = to_flat(state)
    restored = from_flat(type(state), arrays, scalars)
    assert [a.shape for a in restored.exp_avg_res_col] == [(3, 5), (2,)]


THREE_D = [c for c in CASES if c.id.startswith("came-3d")]
FACTORS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")


@pytest.mark.torch
@pytest.mark.skipif(not checks.HAVE_TORCH, reason="compares against came-pytorch's state")
@pytest.mark.parametrize("case", THREE_D, ids=case_ids(THREE_D))
def test_factors_of_matrices_and_a_3d_tensor_match_came_pytorch(case: Case) -> None:
    if not config_available(case.config):
        pytest.skip("the reference package is not installed")
    ours, theirs = optserve_state(case), torch_state(case)
    rtol = {"float32": 1e-5, "float64": 1e-10}[case.config["dtype"]]
    factored = [n for n, spec in case.config["params"].items() if len(spec["shape"]) >= 2]
    for k, name in enumerate(factored):
        for key in FACTORS:
            mine, package = getattr(ours, key)[k], theirs[name][key]
            np.testing.assert_allclose(mine, package, rtol=rtol, atol=0, err_msg=key)
