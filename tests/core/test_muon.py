"""Muon: update rule against torch, Newton-Schulz in bfloat16, 2-D only, validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.optimizers.muon import NS_COEFFICIENTS, adjusted_lr, lerp, newton_schulz
from service.core.plan import plan_from_config
from tests.core import optimizer_checks as checks
from tests.core.cases import DTYPES
from tests.core.cases.muon import CASES

needs_torch = pytest.mark.skipif(not checks.HAVE_TORCH, reason="compares against torch itself")

INVALID: list[checks.Rejection] = [
    ({"lr": -0.02}, "lr", "Learning rate should be >= 0 but is: -0.02"),
    ({"momentum": -0.9}, "momentum", "momentum should be >= 0 but is: -0.9"),
    ({"weight_decay": -0.1}, "weight_decay", "weight decay should be >= 0 but is: -0.1"),
    (
        {"adjust_lr_fn": "sqrt"},
        "adjust_lr_fn",
        "Adjust learning rate function sqrt is not supported",
    ),
]

test_update_matches_torch_for_200_steps = checks.updates_match_torch(CASES)
test_state_round_trip_continues_exactly = checks.checkpoints_continue_exactly(CASES)
test_momentum_buffers_match_torch = checks.state_matches_torch(
    CASES,
    scalars=(),
    tensors=("momentum_buffer",),
    tolerance={dtype: (1e-6, 1e-7) for dtype in DTYPES},
)
test_arguments_and_defaults_are_torchs = checks.signatures_match_torch("Muon")
test_invalid_hyperparameters_name_argument_and_value = checks.invalid_hyperparameters_rejected(
    {"Muon": INVALID}
)


SHAPES = [(7, 5), (5, 7), (6, 6), (3, 11), (12, 4), (1, 9), (9, 1)]


@pytest.mark.torch
@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_newton_schulz_is_torchs_bfloat16_iteration_to_the_bit(dtype: str) -> None:
    import torch
    from torch.optim._muon import _zeropower_via_newtonschulz

    rng = np.random.default_rng(7)
    for trial in range(140):
        shape = SHAPES[trial % len(SHAPES)]
        update = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(dtype)
        coefficients = NS_COEFFICIENTS if trial % 2 else (3.0, -3.2, 1.1)
        expected = _zeropower_via_newtonschulz(torch.from_numpy(update), coefficients, 5, 1e-7)
        got = newton_schulz(update, coefficients, 5, 1e-7)
        np.testing.assert_array_equal(got, expected.float().numpy(), err_msg=str(shape))


def test_newton_schulz_keeps_singular_vectors_and_pulls_values_towards_one() -> None:
    rng = np.random.default_rng(8)
    u, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    sigma = np.array([3.0, 2.0, 1.5, 1.0, 0.8])
    update = u[:, :5] @ np.diag(sigma) @ v.T
    ortho = newton_schulz(update, NS_COEFFICIENTS, 5, 1e-7).astype(np.float64)
    assert ortho.shape == (8, 5)
    # In the input's singular bases the output is diagonal up to bfloat16 noise, with
    # values in the band the tuned quintic lands in (about 0.7 to 1.2).
    core = u[:, :5].T @ ortho @ v
    off_diagonal = core - np.diag(np.diag(core))
    assert np.abs(off_diagonal).max() < 0.05
    assert np.diag(core).min() > 0.6 and np.diag(core).max() < 1.3


@pytest.mark.torch
@needs_torch
@pytest.mark.parametrize("weight", [0.05, 0.3, 0.7, 0.95])
def test_lerp_is_torchs_fused_lerp_to_the_bit(weight: float) -> None:
    import torch

    rng = np.random.default_rng(9)
    start = rng.standard_normal(1000).astype(np.float32)
    end = rng.standard_normal(1000).astype(np.float32)
    expected = torch.from_numpy(start).lerp(torch.from_numpy(end), weight).numpy()
    np.testing.assert_array_equal(lerp(start, end, weight), expected)


def test_lr_is_adjusted_by_the_matrix_shape() -> None:
    assert adjusted_lr(0.1, None, (8, 2)) == 0.1 * 2.0
    assert adjusted_lr(0.1, "original", (2, 8)) == 0.1
    assert adjusted_lr(0.1, "match_rms_adamw", (2, 8)) == 0.1 * 0.2 * 8**0.5


@pytest.mark.parametrize("shape", [[5], [2, 3, 4], []])
def test_only_2d_parameters_are_accepted(shape: list[int]) -> None:
    config = {
        "optimizer": {"name": "muon"},
        "params": {"w": {"shape": [4, 3]}, "x": {"shape": shape}},
    }
    with pytest.raises(InvalidHyperparameter) as caught:
        plan_from_config(config)
    assert caught.value.argument == "params"
    assert "Muon only supports 2D parameters" in str(caught.value)
    assert str(shape) in str(caught.value)


def test_other_optimizers_can_take_the_vectors_in_a_separate_session() -> None:
    plan = plan_from_config({"optimizer": {"name": "Muon"}, "params": {"w": {"shape": [4, 3]}}})
    assert plan.needs_params  # weight_decay defaults to 0.1
    no_decay = {"name": "Muon", "weight_decay": 0.0}
    assert not plan_from_config(
        {"optimizer": no_decay, "params": {"w": {"shape": [4, 3]}}}
    ).needs_params


STEP_TIME_INVALID: list[tuple[dict[str, Any], str, str]] = [
    (
        {"ns_steps": 100},
        "ns_steps",
        "Number of steps must be less than 100 for computational efficiency",
    ),
    (
        {"ns_coefficients": [3.0, -4.0]},
        "ns_coefficients",
        "Coefficients must be a tuple of exactly 3 values",
    ),
]


@pytest.mark.parametrize(("given", "argument", "message"), STEP_TIME_INVALID)
def test_newton_schulz_settings_are_checked_at_creation(
    given: dict[str, Any], argument: str, message: str
) -> None:
    # torch raises these only when the first step runs; optserve refuses the session.
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get("Muon").resolve(given, where="optimizer.")
    assert caught.value.argument == f"optimizer.{argument}"
    assert str(caught.value) == message
    assert caught.value.value == given[argument]
    if checks.HAVE_TORCH:
        import torch

        param = torch.zeros(3, 2, requires_grad=True)
        param.grad = torch.ones(3, 2)
        muon: Any = torch.optim.Muon([param], **given)
        with pytest.raises(ValueError) as torch_caught:
            muon.step()
        assert str(torch_caught.value) == message


def test_device_knobs_are_not_muon_arguments() -> None:
    with pytest.raises(InvalidHyperparameter, match="unknown argument foreach;"):
        optimizers.get("Muon").resolve({"foreach": False})
