"""An oracle for the sessions tests: core's training step applied directly, in a loop.

The sessions layer adds validation, logging, idempotency and recovery around
``service.core.training``; whatever it does, the numbers must be exactly what applying
the same accepted steps to core directly gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state


def core_params(
    config: Mapping[str, Any],
    start: Mapping[str, np.ndarray],
    steps: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Params after applying every gradient dict in ``steps`` to ``start``."""
    plan = plan_from_config({k: v for k, v in config.items() if k != "labels"})
    state = initial_state(plan)
    params = [np.array(start[t.name], dtype=plan.dtype).reshape(t.shape) for t in plan.tensors]
    for grads in steps:
        g = [np.array(grads[t.name], dtype=plan.dtype) for t in plan.tensors]
        out = [np.empty(t.shape, dtype=plan.dtype) for t in plan.tensors]
        outcome = apply_step(plan, state, g, params if plan.needs_params else None, out)
        if outcome.applied:
            for p, d in zip(params, out, strict=True):
                p += d
    return {t.name: p for t, p in zip(plan.tensors, params, strict=True)}
