"""SOAP: update rule against pytorch_optimizer, its state, arguments and validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.group_changes import plan_edit
from service.core.optimizers.soap import merge_small_dims
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state
from tests.core import optimizer_checks as checks
from tests.core.cases.soap import CASES as ALL_CASES
from tests.core.cases.soap import TOLERANCE
from tests.core.reference_classes import available

CASES = [c for c in ALL_CASES if set(c.config) == {"optimizer", "params", "dtype"}]
"""The cases on one group without clipping or schedule: what ``update`` alone must match."""

INVALID: list[checks.Rejection] = [
    ({"lr": -0.1}, "lr", "learning rate must be positive. (-0.1 > 0)"),
    ({"betas": [1.0, 0.95]}, "betas", "beta1 must be in the range [0.0, 1.0)"),
    ({"betas": [0.9, -0.5]}, "betas", "beta2 must be in the range [0.0, 1.0)"),
    ({"shampoo_beta": -0.1}, "shampoo_beta", "shampoo_beta must be non-negative"),
    ({"weight_decay": -1.0}, "weight_decay", "weight_decay must be non-negative"),
    (
        {"precondition_frequency": 0},
        "precondition_frequency",
        "precondition_frequency must be positive",
    ),
    ({"max_precondition_dim": 0}, "max_precondition_dim", "max_precondition_dim must be positive"),
    ({"eps": -1e-8}, "eps", "eps must be non-negative"),
]
BEYOND_PACKAGE: list[checks.Rejection] = [
    # The package takes it, and its statistics then extrapolate.
    ({"shampoo_beta": 1.5}, "shampoo_beta", "shampoo_beta must be at most 1"),
]
test_values_the_package_takes_and_runs_on_meaninglessly_are_refused = checks.refused_beyond_package(
    "SOAP", BEYOND_PACKAGE
)

test_update_matches_pytorch_optimizer_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES, prime=12)
test_moments_match_pytorch_optimizer = checks.state_matches_torch(
    [c for c in CASES if "nonsquare" not in c.id],
    scalars=(),
    tensors=("exp_avg", "exp_avg_sq"),
    tolerance={"float32": (1e-4, 1e-5), "float64": (1e-5, 1e-7)},
)
test_arguments_and_defaults_are_pytorch_optimizers = checks.signatures_match_torch("SOAP")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"SOAP": INVALID}
)


@pytest.mark.parametrize(
    ("shape", "max_dim"),
    [([1, 2, 512, 1, 2048, 1, 3, 4], 1024), ([1, 2, 768, 1, 2048], 1024), ([3, 4, 5], 12)],
)
def test_merge_small_dims_is_the_packages(shape: list[int], max_dim: int) -> None:
    shapes = pytest.importorskip("pytorch_optimizer.optimizer.utils.shape")
    assert merge_small_dims(shape, max_dim) == shapes.merge_small_dims(shape, max_dim)


def test_merging_a_tensor_into_one_dimension_is_refused_up_front() -> None:
    config: dict[str, Any] = {
        "optimizer": {"name": "SOAP", "merge_dims": True, "max_precondition_dim": 12},
        "params": {"w": {"shape": [3, 4]}},
    }
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == "params"
    assert "merge_dims" in str(caught.value)


def test_the_first_step_moves_nothing_and_tensors_start_at_their_first_gradient() -> None:
    config: dict[str, Any] = {
        "optimizer": {"name": "SOAP", "weight_decay": 0.1},
        "params": {"a": {"shape": [3, 3]}, "b": {"shape": [2]}},
        "missing_grads": "skip",
        "dtype": "float64",
    }
    plan = plan_from_config(config)
    state = initial_state(plan)
    params = [np.ones((3, 3)), np.ones(2)]
    out = [np.empty((3, 3)), np.empty(2)]
    apply_step(plan, state, [np.eye(3), None], params, out)
    assert not out[0].any() and not out[1].any()
    record = state.opt_states[0]
    assert record.step == 1 and record.started == [True, False]
    apply_step(plan, state, [np.eye(3), None], params, out)
    assert out[0].any() and not out[1].any()
    assert record.started == [True, False] and record.step == 2


@pytest.mark.skipif(
    not (checks.HAVE_TORCH and available("SOAP")), reason="compares against pytorch_optimizer"
)
def test_a_tensor_starting_late_follows_the_package() -> None:
    """The package's group step advances for every tensor, and a tensor's statistics start
    at its first gradient (gathered twice that step, as the package does)."""
    import torch

    from tests.core.reference_classes import reference_class

    config: dict[str, Any] = {
        "optimizer": {"name": "SOAP", "precondition_frequency": 3},
        "params": {"a": {"shape": [3, 3]}, "b": {"shape": [4, 4]}},
        "missing_grads": "skip",
        "dtype": "float64",
    }
    plan = plan_from_config(config)
    state = initial_state(plan)
    rng = np.random.default_rng(4)
    params = [rng.standard_normal((3, 3)), rng.standard_normal((4, 4))]
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    reference = reference_class("SOAP")(tensors, precondition_frequency=3)
    for step in range(12):
        grads = [rng.standard_normal((3, 3)), rng.standard_normal((4, 4))]
        given: list[np.ndarray | None] = [grads[0], grads[1] if step >= 4 else None]
        out = [np.empty_like(p) for p in params]
        apply_step(plan, state, given, params, out)
        for p, d in zip(params, out, strict=True):
            p += d
        for t, g in zip(tensors, given, strict=True):
            t.grad = None if g is None else torch.tensor(g)
        reference.step()
    for p, t in zip(params, tensors, strict=True):
        np.testing.assert_allclose(p, t.detach().numpy(), **TOLERANCE["float64"])


def test_vectors_without_precondition_1d_keep_no_statistics() -> None:
    optimizer = optimizers.get("SOAP")
    hp = optimizer.resolve({})
    state = optimizer.init([(4,), (3, 5)], hp, np.dtype(np.float32))
    assert [g.shape for g in state.gg] == [(3, 3), (5, 5)]
    hp = optimizer.resolve({"precondition_1d": True})
    state = optimizer.init([(4,), (3, 5)], hp, np.dtype(np.float32))
    assert [g.shape for g in state.gg] == [(4, 4), (3, 3), (5, 5)]


def test_an_edit_turning_on_merge_dims_for_a_small_tensor_is_refused() -> None:
    config: dict[str, Any] = {
        "optimizer": {"name": "SOAP", "max_precondition_dim": 12},
        "params": {"w": {"shape": [3, 4]}},
    }
    plan = plan_from_config(config)
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_edit(plan, initial_state(plan), 0, {"merge_dims": True})
    assert caught.value.argument == "param_groups[0].merge_dims"


OVERFLOWING = np.full((3, 3), 1e20, dtype=np.float32)
"""Finite in float32, but its outer products (3e40) are not: the package's first ``eigh``
fails on such a statistic."""


def _overflow_config(**config: Any) -> dict[str, Any]:
    return {
        "optimizer": {"name": "SOAP", "weight_decay": 0.0},
        "params": {"w": {"shape": [3, 3]}, "b": {"shape": [3]}},
        "dtype": "float32",
        **config,
    }


def _state_arrays(state: Any) -> dict[str, np.ndarray]:
    from service.core.state import to_flat

    arrays, scalars = to_flat(state.opt_states[0])
    return {**{k: a.copy() for k, a in arrays.items()}, "scalars": np.array(repr(scalars))}


@pytest.mark.parametrize("later", [False, True])
def test_a_first_gradient_overflowing_the_statistics_is_refused_before_anything_changes(
    later: bool,
) -> None:
    plan = plan_from_config(_overflow_config(missing_grads="skip"))
    state = initial_state(plan)
    out = [np.empty((3, 3), np.float32), np.empty(3, np.float32)]
    if later:  # w starts late: b has stepped, w has no statistics yet
        apply_step(plan, state, [None, np.ones(3, np.float32)], None, out)
    before = _state_arrays(state)
    with pytest.raises(InvalidInput) as caught:
        apply_step(plan, state, [OVERFLOWING.copy(), np.ones(3, np.float32)], None, out)
    assert caught.value.field == "grads.w"
    assert "overflow SOAP's statistics in float32" in str(caught.value)
    after = _state_arrays(state)
    assert before.keys() == after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_an_overflowing_first_gradient_is_skipped_under_nonfinite_skip() -> None:
    plan = plan_from_config(_overflow_config(nonfinite="skip"))
    state = initial_state(plan)
    out = [np.empty((3, 3), np.float32), np.empty(3, np.float32)]
    outcome = apply_step(plan, state, [OVERFLOWING.copy(), np.ones(3, np.float32)], None, out)
    assert not outcome.applied and "grads 'w' overflow" in str(outcome.reason)
    assert state.opt_states[0].started == [False, False]


def test_an_overflowing_gradient_that_clipping_scales_down_is_taken() -> None:
    plan = plan_from_config(_overflow_config(clip_grad_norm={"max_norm": 1.0}))
    state = initial_state(plan)
    out = [np.empty((3, 3), np.float32), np.empty(3, np.float32)]
    outcome = apply_step(plan, state, [OVERFLOWING.copy(), np.ones(3, np.float32)], None, out)
    assert outcome.applied and state.opt_states[0].started == [True, True]
    assert all(np.isfinite(q).all() for q in state.opt_states[0].q)


@pytest.mark.skipif(not checks.HAVE_TORCH or not available("SOAP"), reason="needs the package")
def test_the_package_fails_on_such_a_first_gradient() -> None:
    """What the refusal stands for: the package's eigh raises on the overflowed statistic."""
    import torch

    from tests.core.reference_classes import reference_class

    w = torch.zeros(3, 3, requires_grad=True)
    optimizer = reference_class("SOAP")([w], weight_decay=0.0)
    w.grad = torch.tensor(OVERFLOWING)
    with pytest.raises(RuntimeError):
        optimizer.step()
