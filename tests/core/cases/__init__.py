"""Parity cases: session configurations run for N steps in optserve and in torch.

Each module in this package defines ``CASES: list[Case]``. ``tests/core/test_parity.py``
runs every case through ``service.core.training`` and through real torch.optim (or the
committed golden fixture when torch is not importable) and compares the parameters.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    id: str
    """Unique, used as the pytest id and the fixture file name."""
    config: dict[str, Any]
    """A session config as POST /v1/sessions takes it (optimizer, schedule, params shapes,
    param_groups, clip_grad_norm, clip_grad_value, dtype); no ``data``."""
    steps: int = 200
    seed: int = 0
    grad_scale: float = 1.0
    """Gradients are standard normal times this."""
    metrics: bool = False
    """Feed a deterministic metric to the schedule (ReduceLROnPlateau)."""
    tags: tuple[str, ...] = field(default_factory=tuple)
    tolerance: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per dtype, ``rtol``/``atol`` replacing the default where the reference computes in a
    way optserve cannot follow bit for bit: measured, see docs/torch-compatibility.md."""

    def tolerance_of(self, default: Mapping[str, Mapping[str, float]]) -> Mapping[str, float]:
        """This case's tolerance: its own for its dtype, else ``default[dtype]``."""
        dtype = self.config.get("dtype", "float32")
        return self.tolerance.get(dtype, default[dtype])


DEFAULT_PARAMS: dict[str, Any] = {"w": {"shape": [7, 5]}, "b": {"shape": [5]}}
DTYPES = ("float32", "float64")

WARMUP: dict[str, Any] = {"name": "LinearLR", "start_factor": 0.25, "total_iters": 40}
"""Scales lr before the first step, as LinearLR's constructor does in torch: for the
optimizers whose state starts from the lr the first step sees (ASGD's eta, Rprop's step
sizes)."""


def dtype_cases(configs: Mapping[str, Mapping[str, Any]], **fields: Any) -> list[Case]:
    """A case per dtype (float32's first) and named config, with id ``{name}-{dtype}``.

    ``fields`` are the other :class:`Case` fields, the same for every case.
    """
    return [
        Case(id=f"{name}-{dtype}", config={**config, "dtype": dtype}, **fields)
        for dtype in DTYPES
        for name, config in configs.items()
    ]


def optimizer_cases(
    variants: Mapping[str, Mapping[str, Any]],
    params: Mapping[str, Any] = DEFAULT_PARAMS,
    **fields: Any,
) -> list[Case]:
    """:func:`dtype_cases` of named optimizer configs, each on ``params`` alone."""
    return dtype_cases(
        {name: {"optimizer": optimizer, "params": params} for name, optimizer in variants.items()},
        **fields,
    )


def warmup_cases(name: str, optimizer: Mapping[str, Any]) -> list[Case]:
    """``{name}-warmup-{dtype}``: ``optimizer`` under :data:`WARMUP`."""
    return dtype_cases(
        {f"{name}-warmup": {"optimizer": optimizer, "schedule": WARMUP, "params": DEFAULT_PARAMS}}
    )


def case_ids(cases: Sequence[Case]) -> list[str]:
    """pytest ids: the case ids (golden fixtures are named after them too)."""
    return [c.id for c in cases]


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for module in pkgutil.iter_modules(__path__):
        cases.extend(importlib.import_module(f"{__name__}.{module.name}").CASES)
    return cases
