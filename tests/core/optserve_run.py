"""Run a parity case through optserve's core, the way a session holding params would."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state, schedule_step
from tests.core.parity_inputs import Inputs
from tests.core.torch_reference import MANUAL_PERIOD


def run_optserve(config: Mapping[str, Any], inputs: Inputs) -> dict[str, np.ndarray]:
    plan = plan_from_config(config)
    state = initial_state(plan)
    params = [inputs.initial[t.name].copy() for t in plan.tensors]
    out = [np.empty_like(p) for p in params]
    spec = plan.schedule
    for n in range(inputs.steps):
        grads = [
            None if t.name not in inputs.grads[n] else inputs.grads[n][t.name].copy()
            for t in plan.tensors
        ]
        metric = inputs.losses[n] if spec is not None and spec.schedule.needs_metric else None
        apply_step(plan, state, grads, params if plan.needs_params else None, out, metric)
        for p, d in zip(params, out, strict=True):
            p += d
        if spec is not None and spec.interval == "manual" and (n + 1) % MANUAL_PERIOD == 0:
            schedule_step(plan, state, metric)
    return {t.name: p for t, p in zip(plan.tensors, params, strict=True)}
