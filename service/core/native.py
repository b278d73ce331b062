"""Native kernels: the step's hottest float32 passes as single loops, when they were built.

``service/core/_native.c`` holds fused versions of numpy computations of core: the float32
lanes of a metric's sum of squares and the float64 lanes of the sum of squares clipping
reads, the halving that sums any reduction's lanes (:mod:`service.core.reductions`; one
ufunc call per level cost most of a small tensor's norm: 15,625 float32 values took 68 us
with numpy, 15.5 us natively), and Adam's kernel
(:mod:`service.core.optimizers.adam`, without ``amsgrad``). Each does the same IEEE
float32 operations in the same order as numpy does, one element at a time, so the results
are the same bits (``tests/core/test_native.py``); a step just reads its data once instead
of once per operation (1M float32, warm caches: Adam 1.08 -> 0.34 ms on one thread, a norm
0.40 -> 0.18 ms).

The extension is compiled at install time where a C compiler is present (``setup.py``).
Without it, or with ``OPTSERVE_NATIVE=0`` in the environment, core uses numpy for
everything: slower, the same numbers.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


def _import() -> ModuleType | None:
    try:
        return importlib.import_module("service.core._native")
    except ImportError:
        return None


DECAY_NONE, DECAY_COUPLED, DECAY_DECOUPLED = 0, 1, 2
"""Adam's weight decay, as ``_native.c``'s ``enum decay_mode`` numbers it."""

_compiled = _import()
kernels: ModuleType | None = None if os.environ.get("OPTSERVE_NATIVE") == "0" else _compiled
"""The compiled module in use, or None where core runs numpy alone."""


def built() -> bool:
    """Whether the native kernels were compiled and import (in use or not)."""
    return _compiled is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Run the numpy versions meanwhile (for comparing the two)."""
    global kernels
    saved, kernels = kernels, None
    try:
        yield
    finally:
        kernels = saved
