"""Deterministic inputs for a parity case: initial params, gradients and losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tests.core.cases import Case


@dataclass(frozen=True)
class Inputs:
    steps: int
    initial: dict[str, np.ndarray]
    grads: list[dict[str, np.ndarray]]
    """Per step; a session with ``missing_grads: "skip"`` lacks some tensors on some steps."""
    losses: list[float]


def make_inputs(case: Case) -> Inputs:
    """Seeded draws in float64, rounded to the session dtype so both sides see the same bits."""
    dtype = np.dtype(case.config.get("dtype", "float32"))
    rng = np.random.default_rng(case.seed)
    shapes = {name: tuple(spec["shape"]) for name, spec in case.config["params"].items()}
    initial = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    grads = [
        {n: (rng.standard_normal(s) * case.grad_scale).astype(dtype) for n, s in shapes.items()}
        for _ in range(case.steps)
    ]
    if case.config.get("missing_grads") == "skip":
        # Its own generator, so that the draws above stay those of the other cases.
        gaps = np.random.default_rng(case.seed + 1).random((case.steps, len(shapes))) < 0.3
        grads = [
            {n: g for k, (n, g) in enumerate(step.items()) if not gaps[i, k]}
            for i, step in enumerate(grads)
        ]
    # A loss that falls, then plateaus and wobbles, so ReduceLROnPlateau has work to do.
    losses = [1.0 / (1 + n // 15) + 0.01 * math.sin(n) for n in range(case.steps)]
    return Inputs(case.steps, initial, grads, losses)
