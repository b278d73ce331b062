"""AdamWScheduleFree and SGDScheduleFree against the schedulefree package: the training
point (the parity cases), the evaluation point its ``eval()`` gives, its group scalars,
arguments and validation."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.optimizers.schedule_free import ScheduleFree
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state
from tests.core import optimizer_checks as checks
from tests.core.cases import DTYPES, Case
from tests.core.recorded import assert_current
from tests.core.reference_classes import available
from tests.core.schedule_free_reference import (
    EVAL_CASES,
    GROUP_SCALARS,
    NAMES,
    fixture_path,
    load,
    run_package,
)
from tests.core.update_run import UpdateRun

HAVE_PACKAGE = checks.HAVE_TORCH and available("AdamWScheduleFree")

INVALID: dict[str, list[checks.Rejection]] = {
    "SGDScheduleFree": [
        ({"lr": -0.1}, "lr", "Invalid learning rate: -0.1"),
        ({"weight_decay": -0.01}, "weight_decay", "Invalid weight_decay value: -0.01"),
        ({"momentum": 0.0}, "momentum", "Momentum must be between 0 and 1 exclusive: 0.0"),
        ({"momentum": 1.0}, "momentum", "Momentum must be between 0 and 1 exclusive: 1.0"),
    ]
}

test_training_point_matches_schedulefree_for_200_steps = checks.updates_match_torch(EVAL_CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(EVAL_CASES)
test_z_and_second_moment_match_schedulefree = checks.state_matches_torch(
    [c for c in EVAL_CASES if c.config["optimizer"]["name"] == "AdamWScheduleFree"],
    scalars=(),
    tensors=("z", "exp_avg_sq"),
    tolerance={d: (1e-5, 1e-6) for d in DTYPES},
)
test_arguments_and_defaults_are_schedulefrees = checks.signatures_match_torch(*NAMES)
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    INVALID
)


def _reference(case: Case) -> dict[str, np.ndarray]:
    return run_package(case) if HAVE_PACKAGE else load(case)


def _run(case: Case) -> tuple[UpdateRun, ScheduleFree]:
    run = UpdateRun(case)
    for grads in run.grads():
        run.step(grads, run.needed_params())
    assert isinstance(run.optimizer, ScheduleFree)
    return run, run.optimizer


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c.id for c in EVAL_CASES])
def test_evaluation_point_is_what_eval_puts_in_the_parameters(case: Case) -> None:
    expected = _reference(case)
    run, optimizer = _run(case)
    x = optimizer.evaluation_point(run.state, run.params, run.hp)
    tol = checks.TOLERANCE[run.params[0].dtype.name]
    for name, got in zip(run.names, x, strict=True):
        assert got.dtype == run.params[0].dtype
        np.testing.assert_allclose(got, expected[f"eval/{name}"], **tol, err_msg=name)
        # train() after eval() gives y back up to rounding; the session never left it.
        np.testing.assert_allclose(
            run.params[run.names.index(name)], expected[f"train/{name}"], **tol
        )
    # x is the average of the z: not the training point.
    assert not np.allclose(x[0], run.params[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c.id for c in EVAL_CASES])
def test_group_scalars_are_the_packages(case: Case) -> None:
    expected = _reference(case)
    run, _ = _run(case)
    for key in GROUP_SCALARS:
        assert float(getattr(run.state, key)) == expected[f"group/{key}"][0], key


def test_evaluation_point_before_any_step_is_the_parameters() -> None:
    optimizer = optimizers.get("AdamWScheduleFree")
    assert isinstance(optimizer, ScheduleFree)
    hp = optimizer.resolve({})
    state = optimizer.init([(3,)], hp, np.dtype(np.float32))
    params = [np.arange(3, dtype=np.float32)]
    np.testing.assert_array_equal(optimizer.evaluation_point(state, params, hp)[0], params[0])


def test_state_is_kept_per_group_so_a_missing_gradient_reads_as_zero() -> None:
    config = {
        "optimizer": {"name": "SGDScheduleFree", "lr": 0.1},
        "params": {"a": {"shape": [2]}, "b": {"shape": [2]}},
        "missing_grads": "skip",
    }
    plan = plan_from_config(config)
    assert not plan.optimizer.per_tensor_state
    state = initial_state(plan)
    params = [np.ones(2, np.float32), np.ones(2, np.float32)]
    out = [np.empty(2, np.float32), np.empty(2, np.float32)]
    apply_step(plan, state, [np.ones(2, np.float32), None], params, out)
    assert state.opt_states[0].k == 1
    assert len(state.opt_states[0].z) == 2  # both tensors' z, b's at its parameters


def test_steps_need_parameter_values() -> None:
    optimizer = optimizers.get("SGDScheduleFree")
    assert optimizer.needs_params(optimizer.resolve({"weight_decay": 0.0}))


@pytest.mark.skipif(not HAVE_PACKAGE, reason="checks committed fixtures against schedulefree")
@pytest.mark.parametrize("case", EVAL_CASES, ids=[c.id for c in EVAL_CASES])
def test_fixture_is_current(case: Case) -> None:
    assert fixture_path(case).exists(), "run: python -m tests.core.make_schedule_free_fixtures"
    stored = load(case)
    for key, value in run_package(case).items():
        assert_current(stored[key], value, err_msg=key)


def test_a_zero_interpolation_weight_is_refused_up_front() -> None:
    # The package takes it and fails with ZeroDivisionError in eval().
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get("AdamWScheduleFree").resolve({"betas": [0.0, 0.9]}, where="optimizer.")
    assert caught.value.argument == "optimizer.betas"


@pytest.mark.parametrize("given", [{"r": 1e300}, {"weight_lr_power": -3.0, "lr": 0.0}])
def test_averaging_weights_past_float_range_compute_on(given: dict[str, float]) -> None:
    # Python's ** raises where IEEE arithmetic gives inf; a step must not fail for it.
    optimizer = optimizers.get("SGDScheduleFree")
    hp = optimizer.resolve(given)
    state = optimizer.init([(2,)], hp, np.dtype(np.float64))
    params, out = [np.ones(2)], [np.empty(2)]
    for _ in range(3):
        state = optimizer.update([np.ones(2)], state, params, hp, out)
    assert state.k == 3
