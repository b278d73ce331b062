"""Whether a committed fixture still stands for its live reference on this machine.

torch picks its CPU kernels' vector width when it starts (AVX2, AVX512, ...), and another
width sums float32 lanes in another order: a fixture recorded on one machine differs from
live torch on another in the last bits, more so after hundreds of steps. A fixture is
current when it is within the parity tolerance of the live reference, which is what the
parity tests ask of it when they use it in torch's place. A stale fixture, one whose case
was edited without regenerating it, is off by far more than that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tests.core.optimizer_checks import TOLERANCE


def assert_current(
    stored: Any,
    live: Any,
    err_msg: str = "",
    dtype: str | None = None,
    tolerance: Mapping[str, float] | None = None,
) -> None:
    """``dtype`` is the precision the reference computed in, where the recording keeps its
    values in another (a float32 run's points saved as float64). ``tolerance``: a case's
    own, measured where the reference's kernels (an eigendecomposition, say) round
    differently from machine to machine."""
    stored_array, live_array = np.asarray(stored), np.asarray(live)
    assert stored_array.dtype == live_array.dtype, err_msg
    assert stored_array.shape == live_array.shape, err_msg
    tol = tolerance or TOLERANCE[dtype or live_array.dtype.name]
    np.testing.assert_allclose(stored_array, live_array, **tol, err_msg=err_msg)
