"""Adafactor: update rule against torch, factored state, eps with null, validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.plan import plan_from_config
from tests.core import optimizer_checks as checks
from tests.core.cases import Case, case_ids
from tests.core.cases.adafactor import CASES
from tests.core.optimizer_state import optserve_state, torch_state

INVALID: list[checks.Rejection] = [
    ({"lr": -0.01}, "lr", "Learning rate should be >= 0 but is: -0.01"),
    ({"beta2_decay": 0.5}, "beta2_decay", "beta2_decay should be <= 0 but is: 0.5"),
    ({"eps": [-1e-30, 1e-3]}, "eps", "epsilon1 should be >= 0 but is: -1e-30"),
    ({"eps": [None, -0.001]}, "eps", "epsilon2 should be >= 0 but is: -0.001"),
    ({"d": 0.5}, "d", "Clipping threshold d should be >= 1 but is: 0.5"),
    ({"weight_decay": -0.1}, "weight_decay", "weight_decay should be >= 0 but is: -0.1"),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Adafactor")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Adafactor": INVALID}
)


@pytest.mark.torch
@pytest.mark.skipif(not checks.HAVE_TORCH, reason="compares against torch's state tensors")
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_state_matches_torch(case: Case) -> None:
    ours, theirs = optserve_state(case), torch_state(case)
    tol = {"float32": 1e-5, "float64": 1e-10}[case.config["dtype"]]
    row, col, full = iter(ours.row_var), iter(ours.col_var), iter(ours.variance)
    for name, spec in case.config["params"].items():
        assert ours.step == theirs[name]["step"]
        pairs = (
            [(next(row), theirs[name]["row_var"]), (next(col), theirs[name]["col_var"])]
            if len(spec["shape"]) > 1
            else [(next(full), theirs[name]["variance"])]
        )
        for mine, torchs in pairs:
            # The moments are tiny for small gradients: compare relative to their scale.
            np.testing.assert_allclose(mine, torchs, rtol=tol, atol=tol * np.abs(torchs).max())


def test_matrices_and_higher_keep_row_and_column_factors_of_the_last_two_dims() -> None:
    adafactor = optimizers.get("Adafactor")
    shapes = [(7, 5), (5,), (3, 4, 6), ()]
    state = adafactor.init(shapes, adafactor.resolve({}), np.dtype("float32"))
    assert [r.shape for r in state.row_var] == [(7, 1), (3, 4, 1)]
    assert [c.shape for c in state.col_var] == [(1, 5), (3, 1, 6)]
    assert [v.shape for v in state.variance] == [(5,), ()]


def _one_step(eps: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    adafactor = optimizers.get("Adafactor")
    hp = adafactor.resolve({"eps": eps} if eps is not None else {})
    state = adafactor.init([shape], hp, np.dtype(dtype))
    # One element far below eps1: its U is g / eps1, the others' U is their sign.
    grad = np.ones(shape, dtype=dtype)
    grad.reshape(-1)[0] = np.finfo(dtype).eps / 10
    param = np.ones(shape, dtype=dtype)
    out = [np.empty(shape, dtype=dtype)]
    adafactor.update([grad], state, [param], hp, out)
    return out[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_null_eps1_is_the_machine_epsilon_of_the_sessions_dtype(dtype: str) -> None:
    assert optimizers.get("Adafactor").resolve({})["eps"] == (None, 1e-3)
    machine = float(np.finfo(dtype).eps)
    np.testing.assert_array_equal(
        _one_step(None, (4,), dtype), _one_step([machine, 1e-3], (4,), dtype)
    )
    assert not np.array_equal(
        _one_step(None, (4,), dtype), _one_step([machine * 2, 1e-3], (4,), dtype)
    )


def test_a_scalar_parameter_steps_like_a_one_element_vector() -> None:
    adafactor = optimizers.get("Adafactor")
    hp = adafactor.resolve({"lr": 0.1, "weight_decay": 0.2})
    moves: dict[tuple[int, ...], list[float]] = {}
    for shape in [(), (1,)]:
        state = adafactor.init([shape], hp, np.dtype("float64"))
        param, out = np.full(shape, 0.7), [np.empty(shape)]
        moves[shape] = []
        for g in (0.3, -1.2, 0.05):
            state = adafactor.update([np.full(shape, g)], state, [param], hp, out)
            param += out[0]
            moves[shape].append(float(out[0].reshape(-1)[0]))
    assert moves[()] == moves[(1,)]


def test_always_needs_parameter_values() -> None:
    plan = plan_from_config(
        {"optimizer": {"name": "adafactor"}, "params": {"w": {"shape": [3, 2]}}}
    )
    assert plan.needs_params


@pytest.mark.parametrize("eps", [1e-3, [1e-30], [None, None], ["a", 1e-3], "1e-3", [True, 1e-3]])
def test_malformed_eps_is_rejected_naming_it(eps: Any) -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get("Adafactor").resolve({"eps": eps}, where="optimizer.")
    assert caught.value.argument == "optimizer.eps"
    assert repr(eps) in str(caught.value)
