"""Parity cases: session configurations run for N steps in optserve and in torch.

Each module in this package defines ``CASES: list[Case]``. ``tests/core/test_parity.py``
runs every case through ``service.core.training`` and through real torch.optim (or the
committed golden fixture when torch is not importable) and compares the parameters.
"""

from __future__ import annotations

import importlib
import pkgutil
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


DEFAULT_PARAMS: dict[str, Any] = {"w": {"shape": [7, 5]}, "b": {"shape": [5]}}


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for module in pkgutil.iter_modules(__path__):
        cases.extend(importlib.import_module(f"{__name__}.{module.name}").CASES)
    return cases
