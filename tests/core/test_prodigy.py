"""Prodigy: update rule against prodigyopt, its state, its shared d estimate over groups,
arguments and validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.group_changes import plan_edit
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state
from tests.core import optimizer_checks as checks
from tests.core.cases import DTYPES
from tests.core.cases.beyond_torch import CASES as ALL_CASES
from tests.core.reference_classes import available, reference_class

CASES = [
    c
    for c in ALL_CASES
    if c.config["optimizer"]["name"] == "Prodigy"
    and set(c.config) == {"optimizer", "params", "dtype"}
]
"""The cases on one group without clipping or schedule: what ``update`` alone must match."""
HAVE_PACKAGE = checks.HAVE_TORCH and available("Prodigy")
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="compares against prodigyopt")

INVALID: list[checks.Rejection] = [
    ({"d0": 0.0}, "d0", "Invalid d0 value: 0.0"),
    ({"lr": 0.0}, "lr", "Invalid learning rate: 0.0"),
    ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ({"betas": [1.0, 0.999]}, "betas", "Invalid beta parameter at index 0: 1.0"),
    ({"betas": [0.9, -0.1]}, "betas", "Invalid beta parameter at index 1: -0.1"),
]
BEYOND_PACKAGE: list[checks.Rejection] = [
    # The package takes these and runs on without ever moving d (or with extrapolating sums).
    ({"beta3": 1.5}, "beta3", "Invalid beta3 value: 1.5"),
    ({"beta3": -0.1}, "beta3", "Invalid beta3 value: -0.1"),
    ({"d_coef": 0.0}, "d_coef", "Invalid d_coef value: 0.0"),
    ({"d_coef": -1.0}, "d_coef", "Invalid d_coef value: -1.0"),
    ({"growth_rate": 0.5}, "growth_rate", "Invalid growth_rate value: 0.5 (d could never grow)"),
    ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
]
test_values_the_package_takes_and_runs_on_meaninglessly_are_refused = checks.refused_beyond_package(
    "Prodigy", BEYOND_PACKAGE
)

test_update_matches_prodigyopt_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_moments_and_estimate_sums_match_prodigyopt = checks.state_matches_torch(
    CASES,
    scalars=(),
    tensors=("exp_avg_sq", "s", "p0"),
    # s sums gradients scaled by d / d0 (values in the hundreds): in float32 it carries the
    # estimate's last-bit differences (see PRODIGY_TOLERANCE) up to 2.2e-3, measured.
    tolerance={"float32": (1e-4, 3e-3), "float64": (1e-10, 1e-12)},
)
test_arguments_and_defaults_are_prodigyopts = checks.signatures_match_torch("Prodigy")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Prodigy": INVALID}
)

TWO_GROUPS: dict[str, Any] = {
    "dtype": "float64",
    "optimizer": {"name": "Prodigy", "weight_decay": 0.01, "d_coef": 2.0},
    "params": {"a": {"shape": [5, 3]}, "b": {"shape": [4]}},
    "param_groups": [{"params": ["b"], "d0": 1e-4, "eps": 1e-6, "slice_p": 2}],
}
ESTIMATE = ("d", "d_max", "d_numerator", "d_hat", "k")


def _run_sessions(config: dict[str, Any], steps: int) -> tuple[Any, list[dict[str, Any]]]:
    """optserve's state and prodigyopt's param_groups after the same steps."""
    import torch

    plan = plan_from_config(config)
    state = initial_state(plan)
    rng = np.random.default_rng(5)
    initial = [rng.standard_normal(t.shape) for t in plan.tensors]
    params = [p.copy() for p in initial]
    tensors = [torch.tensor(p, requires_grad=True) for p in initial]
    second = {k: v for k, v in config["param_groups"][0].items() if k != "params"}
    reference = reference_class("Prodigy")(
        [{"params": [tensors[0]]}, {"params": [tensors[1]], **second}],
        **{k: v for k, v in config["optimizer"].items() if k != "name"},
    )
    for _ in range(steps):
        grads = [rng.standard_normal(t.shape) for t in plan.tensors]
        out = [np.empty_like(p) for p in params]
        apply_step(plan, state, [g.copy() for g in grads], params, out)
        for p, d in zip(params, out, strict=True):
            p += d
        for t, g in zip(tensors, grads, strict=True):
            t.grad = torch.tensor(g)
        reference.step()
    for p, t in zip(params, tensors, strict=True):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-10, atol=1e-12)
    return state, reference.param_groups


@needs_package
def test_every_group_holds_the_packages_shared_estimate() -> None:
    state, groups = _run_sessions(TWO_GROUPS, 30)
    for record, group in zip(state.opt_states, groups, strict=True):
        for key in ESTIMATE:
            assert getattr(record, key) == pytest.approx(group[key], rel=1e-10), key
    assert state.opt_states[0].d > 1e-6  # the estimate moved: the check is not vacuous


def test_the_estimate_sums_over_groups() -> None:
    """One group alone estimates a different d than the same tensor beside another."""
    alone = {**TWO_GROUPS, "params": {"a": {"shape": [5, 3]}}, "param_groups": None}
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((5, 3)), rng.standard_normal(4)]
    initial = [rng.standard_normal((5, 3)), rng.standard_normal(4)]
    estimates = []
    for config, count in ((TWO_GROUPS, 2), (alone, 1)):
        plan = plan_from_config(config)
        state = initial_state(plan)
        params = [p.copy() for p in initial[:count]]
        for _ in range(3):
            out = [np.empty_like(p) for p in params]
            apply_step(plan, state, [g.copy() for g in grads[:count]], params, out)
            for p, d in zip(params, out, strict=True):
                p += d
        estimates.append(state.opt_states[0].d_hat)
    assert estimates[0] != estimates[1]


def test_unequal_nonzero_group_lrs_are_refused_at_creation() -> None:
    config = {**TWO_GROUPS, "param_groups": [{"params": ["b"], "lr": 0.5}]}
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == "param_groups[0].lr"  # the config's entry
    config = {**TWO_GROUPS, "param_groups": [{"params": ["b"], "lr": 2.0}]}
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == "optimizer.lr"  # the default group's, now the smaller
    assert "only supported for values of 0" in str(caught.value)


def test_a_step_with_lrs_made_unequal_is_refused_and_changes_nothing() -> None:
    plan = plan_from_config(TWO_GROUPS)
    state = initial_state(plan)
    state.groups[1]["lr"] = 0.25  # as a hand edit of param_groups[1] would
    grads = [np.ones((5, 3)), np.ones(4)]
    params = [np.ones((5, 3)), np.ones(4)]
    out = [np.full((5, 3), 7.0), np.full(4, 7.0)]
    with pytest.raises(InvalidHyperparameter) as caught:
        apply_step(plan, state, grads, params, out)
    assert caught.value.argument == "param_groups[1].lr"
    assert state.step == 0 and state.opt_states[1].started == [False]
    assert (out[0] == 7.0).all()


def test_slice_p_below_one_is_refused() -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get("Prodigy").resolve({"slice_p": 0}, where="optimizer.")
    assert caught.value.argument == "optimizer.slice_p"


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradients_take_no_step_as_the_package(dtype: str) -> None:
    """No gradient signal: the package returns before counting or moving anything."""
    optimizer = optimizers.get("Prodigy")
    hp = optimizer.resolve({})
    state = optimizer.init([(3,)], hp, np.dtype(dtype))
    out = [np.full(3, 9.0, dtype=dtype)]
    state = optimizer.update([np.zeros(3, dtype)], state, [np.ones(3, dtype)], hp, out)
    assert state.k == 0 and state.d == hp["d0"] and state.started == [True]
    assert (out[0] == 0).all()


def test_an_edit_of_slice_p_after_the_first_step_is_refused() -> None:
    """slice_p sets the size of p0 and s: the package would fail at its next step."""
    plan = plan_from_config(TWO_GROUPS)
    state = initial_state(plan)
    params = [np.ones((5, 3)), np.ones(4)]
    apply_step(plan, state, [np.ones((5, 3)), np.ones(4)], params, [np.empty((5, 3)), np.empty(4)])
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_edit(plan, state, 1, {"slice_p": 4})  # 4 entries: 2 sliced, now 1
    assert caught.value.argument == "param_groups[1].slice_p"
