"""Averaged weights: ``torch.optim.swa_utils.AveragedModel`` on a session's held params.

``{"kind": "ema", "decay": d}`` is ``AveragedModel(model, multi_avg_fn=
get_ema_multi_avg_fn(d))``; ``{"kind": "swa", "start": s, "every": e}`` is the default
equal average, with ``update_parameters`` called after the steps that bring the session's
step to ``s``, ``s + e``, ``s + 2e``, ... (EMA updates after every step). As in torch the
average starts as a copy of the initial parameters, its first update copies the current
ones, and later updates average with the formulas of torch's CPU kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.hparams import check

KINDS = ("ema", "swa")


@dataclass(frozen=True)
class AveragingSpec:
    kind: str
    decay: float = 0.999
    start: int = 0
    every: int = 1

    def describe(self) -> dict[str, Any]:
        if self.kind == "ema":
            return {"kind": "ema", "decay": self.decay}
        return {"kind": "swa", "start": self.start, "every": self.every}

    def due(self, step: int) -> bool:
        """Whether the step that brought the session to ``step`` updates the average."""
        return self.kind == "ema" or (step >= self.start and (step - self.start) % self.every == 0)


@dataclass
class Average:
    values: list[np.ndarray]
    n_averaged: int = 0


def _integer(raw: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"averaging.{key}",
        f"averaging.{key} must be an integer >= {minimum}, got {value!r}",
        value,
    )
    assert isinstance(value, int)
    return value


def parse_averaging(raw: Any) -> AveragingSpec | None:
    if raw is None:
        return None
    check(isinstance(raw, Mapping), "averaging", f"averaging must be an object, got {raw!r}")
    kind = raw.get("kind")
    check(kind in KINDS, "averaging.kind", f"averaging.kind must be 'ema' or 'swa', got {kind!r}")
    allowed = ("kind", "decay") if kind == "ema" else ("kind", "start", "every")
    for key in raw:
        check(
            key in allowed,
            f"averaging.{key}",
            f"unknown field {key!r} for {kind}; expected {', '.join(allowed)}",
        )
    if kind == "ema":
        decay = raw.get("decay", 0.999)
        check(
            isinstance(decay, int | float) and not isinstance(decay, bool) and 0 <= decay <= 1,
            "averaging.decay",
            f"Invalid decay value {decay!r} provided. Please provide a value in [0,1] range.",
            decay,
        )
        return AveragingSpec("ema", decay=float(decay))
    return AveragingSpec(
        "swa", start=_integer(raw, "start", 0, 0), every=_integer(raw, "every", 1, 1)
    )


def begin(params: Sequence[np.ndarray]) -> Average:
    """``AveragedModel(model)``: a deep copy of the parameters, nothing averaged yet."""
    return Average([np.array(p, copy=True) for p in params])


def update(spec: AveragingSpec, average: Average, params: Sequence[np.ndarray]) -> None:
    """``update_parameters(model)``."""
    with np.errstate(over="ignore", invalid="ignore"):
        _update(spec, average, params)
    average.n_averaged += 1


def _update(spec: AveragingSpec, average: Average, params: Sequence[np.ndarray]) -> None:
    if average.n_averaged == 0:
        for avg, p in zip(average.values, params, strict=True):
            avg[...] = p
    elif spec.kind == "ema":
        for avg, p in zip(average.values, params, strict=True):
            _lerp(avg, p, avg.dtype.type(1 - spec.decay))
    else:
        for avg, p in zip(average.values, params, strict=True):
            avg += (p - avg) / avg.dtype.type(average.n_averaged + 1)


def _lerp(start: np.ndarray, end: np.ndarray, weight: Any) -> None:
    """``torch.lerp_`` in place, with its two formulas (the one chosen by the weight)."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (start.dtype.type(1) - weight)
