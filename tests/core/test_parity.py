"""Every parity case: optserve's parameters after N steps equal torch.optim's.

Against live torch when it is importable, else against the committed golden fixtures.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.core import golden
from tests.core.cases import Case, all_cases
from tests.core.optserve_run import run_optserve
from tests.core.parity_inputs import make_inputs
from tests.core.recorded import assert_current
from tests.core.reference_classes import config_available

HAVE_TORCH = importlib.util.find_spec("torch") is not None
TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}
CASES = all_cases()


def _reference(case: Case) -> dict[str, np.ndarray]:
    if HAVE_TORCH and config_available(case.config):
        from tests.core.torch_reference import run_torch

        return run_torch(case.config, make_inputs(case))
    return golden.load(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parameters_match_torch(case: Case) -> None:
    expected = _reference(case)
    got = run_optserve(case.config, make_inputs(case))
    tol = case.tolerance_of(TOLERANCE)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], **tol, err_msg=name)


@pytest.mark.skipif(not HAVE_TORCH, reason="checks committed fixtures against live torch")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_golden_fixture_is_current(case: Case) -> None:
    if not config_available(case.config):
        pytest.skip("the reference package is not installed")
    assert golden.fixture_path(case).exists(), f"run: python -m tests.core.golden {case.id}"
    from tests.core.torch_reference import run_torch

    live = run_torch(case.config, make_inputs(case))
    stored = golden.load(case)
    for name, value in live.items():
        assert_current(stored[name], value, err_msg=name, tolerance=case.tolerance_of(TOLERANCE))


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
