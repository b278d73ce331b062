"""The same steps computed in-process by core, to check what the API returns bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state


class InProcess:
    def __init__(self, config: dict[str, Any], params: dict[str, np.ndarray] | None = None):
        self.plan = plan_from_config(config)
        self.state = initial_state(self.plan)
        self.params = (
            [np.array(params[t.name], dtype=self.plan.dtype) for t in self.plan.tensors]
            if params is not None
            else None
        )

    def step(
        self,
        grads: dict[str, np.ndarray],
        params: dict[str, np.ndarray] | None = None,
        loss: float | None = None,
    ) -> dict[str, np.ndarray]:
        g = [np.array(grads[t.name], dtype=self.plan.dtype) for t in self.plan.tensors]
        if params is not None:
            p: list[np.ndarray] | None = [
                np.array(params[t.name], dtype=self.plan.dtype) for t in self.plan.tensors
            ]
        else:
            p = self.params
        out = [np.zeros(t.shape, self.plan.dtype) for t in self.plan.tensors]
        apply_step(self.plan, self.state, g, p, out, loss)
        if self.params is not None:
            for held, delta in zip(self.params, out, strict=True):
                held += delta
        return {t.name: d for t, d in zip(self.plan.tensors, out, strict=True)}
