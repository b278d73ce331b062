"""One optimizer's ``init``/``update`` driven directly over a parity case's inputs.

The per-optimizer checks (parameters against torch, state against torch, a checkpoint
continuing exactly) all run the same loop; this is that loop, with the parameters kept
in step by adding each delta, as a client does.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from service.core import optimizers
from tests.core.cases import Case
from tests.core.parity_inputs import make_inputs


class UpdateRun:
    """The case's optimizer (one group, no clipping or schedule), fresh state, initial params."""

    def __init__(self, case: Case) -> None:
        given = dict(case.config["optimizer"])
        self.optimizer = optimizers.get(given.pop("name"))
        self.hp = self.optimizer.resolve(given)
        self.inputs = make_inputs(case)
        self.names = list(case.config["params"])
        dtype = np.dtype(case.config.get("dtype", "float32"))
        self.params = [self.inputs.initial[n].copy() for n in self.names]
        self.state: Any = self.optimizer.init([p.shape for p in self.params], self.hp, dtype)
        self.out = [np.empty_like(p) for p in self.params]

    def grads(self, start: int = 0, stop: int | None = None) -> list[list[np.ndarray]]:
        """The gradients of steps ``start`` to ``stop``, one list in ``names`` order per step."""
        return [[g[n] for n in self.names] for g in self.inputs.grads[start:stop]]

    def needed_params(self) -> list[np.ndarray] | None:
        """The parameters when the update reads them, as a session passes them; else None."""
        return self.params if self.optimizer.needs_params(self.hp) else None

    def step(self, grads: list[np.ndarray], params: list[np.ndarray] | None) -> None:
        self.state = self.optimizer.update(grads, self.state, params, self.hp, self.out)
        for p, d in zip(self.params, self.out, strict=True):
            p += d

    def fork(self, state: Any) -> UpdateRun:
        """A twin at the same parameters, continuing from ``state`` (e.g. a restored copy)."""
        twin = copy.copy(self)
        twin.params = [p.copy() for p in self.params]
        twin.out = [np.empty_like(p) for p in self.params]
        twin.state = state
        return twin

    def by_name(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.params, strict=True))
