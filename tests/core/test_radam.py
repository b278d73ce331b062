"""RAdam: update rule against torch, the rectification threshold, validation, round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from tests.core.cases import Case
from tests.core.cases.radam import CASES
from tests.core.optimizer_checks import (
    HAVE_TORCH,
    assert_checkpoint_continues_exactly,
    assert_rejected,
    assert_signature_matches_torch,
    assert_update_matches_torch,
)
from tests.core.optimizer_state import optserve_state, torch_state


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_update_matches_torch_for_200_steps(case: Case) -> None:
    assert_update_matches_torch(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_state_round_trip_continues_exactly(case: Case) -> None:
    assert_checkpoint_continues_exactly(case)


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="compares against torch's state tensors")
@pytest.mark.parametrize("case", CASES[:4], ids=[c.id for c in CASES[:4]])
def test_state_matches_torch(case: Case) -> None:
    ours, theirs = optserve_state(case), torch_state(case)
    for i, name in enumerate(case.config["params"]):
        assert ours.step == theirs[name]["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(
                getattr(ours, key)[i], theirs[name][key], rtol=1e-5, atol=1e-6, err_msg=key
            )


def test_arguments_and_defaults_are_torchs() -> None:
    assert_signature_matches_torch("RAdam")


def _steps(beta2: float, scale: float, count: int) -> list[float]:
    radam = optimizers.get("RAdam")
    hp = radam.resolve({"lr": 0.1, "betas": [0.9, beta2], "eps": 0.0})
    state = radam.init([(1,)], hp, np.dtype("float64"))
    out, steps = [np.empty(1)], []
    for _ in range(count):
        state = radam.update([np.array([scale])], state, None, hp, out)
        steps.append(float(out[0][0]))
    return steps


def _sma_length(beta2: float, t: int) -> float:
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * t * beta2**t / (1 - beta2**t)


@pytest.mark.parametrize("beta2", [0.999, 0.9, 0.6])
def test_adaptive_step_only_once_the_sma_length_exceeds_five(beta2: float) -> None:
    # Unrectified steps are bias-corrected momentum: proportional to the gradient.
    # Rectified ones divide by sqrt(v): with eps = 0 they do not depend on its scale.
    small, large = _steps(beta2, 1.0, 12), _steps(beta2, 8.0, 12)
    for t, (a, b) in enumerate(zip(small, large, strict=True), start=1):
        if _sma_length(beta2, t) > 5:
            assert b == pytest.approx(a, rel=1e-12), t
        else:
            assert b == pytest.approx(8 * a, rel=1e-12), t
            assert a == pytest.approx(-0.1, rel=1e-12), t


INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"lr": -0.001}, "lr", "Invalid learning rate: -0.001"),
    ({"eps": -1.0}, "eps", "Invalid epsilon value: -1.0"),
    ({"betas": [-0.1, 0.999]}, "betas", "Invalid beta parameter at index 0: -0.1"),
    ({"betas": [0.9, 1.0]}, "betas", "Invalid beta parameter at index 1: 1.0"),
    ({"weight_decay": -0.01}, "weight_decay", "Invalid weight_decay value: -0.01"),
]


@pytest.mark.parametrize(("given", "argument", "message"), INVALID)
def test_invalid_hyperparameters_name_argument_and_value(
    given: dict[str, Any], argument: str, message: str
) -> None:
    assert_rejected("RAdam", given, argument, message)
