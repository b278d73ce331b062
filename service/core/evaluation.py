"""The evaluation point of a session's held parameters (``GET .../params?eval=true``).

Schedule-free rules step one point (``y``, the parameters) and evaluate another (``x``,
the average of their base sequence); every other rule evaluates where it steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.core.plan import Plan
from service.core.training import TrainState


def evaluation_point(
    plan: Plan, state: TrainState, params: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """New arrays, one per tensor in the plan's order, each group's by its optimizer."""
    point = [np.asarray(p).copy() for p in params]
    for gi, group in enumerate(plan.groups):
        mine = [params[i] for i in group.indices]
        x = group.optimizer.evaluation_point(state.opt_states[gi], mine, state.groups[gi])
        for i, values in zip(group.indices, x, strict=True):
            point[i] = values
    return point
