"""Gradient accumulation over several step requests: one optimizer step per ``k`` posts.

The reference is torch's loop with ``k`` backward passes of ``loss / k`` (or of ``loss``
for ``"sum"``) before ``step()``: each micro-batch's gradient is scaled and added to the
running sum, and the ``k``-th post steps on it. A tensor no micro-batch had a gradient for
stays without one (torch's ``grad`` stays None), so partial steps work on the sum.

A non-finite micro-batch follows optax's ``MultiSteps`` with ``skip_not_finite``: with
``nonfinite: "skip"`` it is as if that post never happened (the sum and the count stay),
with ``"error"`` it is refused like any bad step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import check

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class AccumulateSpec:
    steps: int
    reduction: str

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "reduction": self.reduction}


@dataclass
class Accumulated:
    """The running sum of an accumulation: what a crash after ``count`` posts resumes with."""

    count: int = 0
    sums: dict[int, np.ndarray] = field(default_factory=dict)
    """Tensor index -> the scaled sum of its micro-batch gradients so far."""
    loss: float | None = None
    """The scaled sum of the losses sent with the micro-batches (None if none was)."""


def parse_accumulate(raw: Any) -> AccumulateSpec | None:
    """``{"steps": k, "reduction": "mean" | "sum"}``; None (or absent) for no accumulation."""
    if raw is None:
        return None
    check(isinstance(raw, Mapping), "accumulate", f"accumulate must be an object, got {raw!r}")
    for key in raw:
        check(
            key in ("steps", "reduction"),
            f"accumulate.{key}",
            f"unknown field {key!r}; expected steps, reduction",
        )
    steps = raw.get("steps")
    check(
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
        "accumulate.steps",
        f"accumulate.steps must be an integer >= 1, got {steps!r}",
        steps,
    )
    reduction = raw.get("reduction", "mean")
    check(
        reduction in REDUCTIONS,
        "accumulate.reduction",
        f"accumulate.reduction must be 'mean' or 'sum', got {reduction!r}",
        reduction,
    )
    assert isinstance(steps, int)
    return AccumulateSpec(steps, str(reduction))


def _scale(spec: AccumulateSpec, dtype: np.dtype[Any]) -> Any:
    return dtype.type(1.0 / spec.steps) if spec.reduction == "mean" else None


def added(
    spec: AccumulateSpec,
    acc: Accumulated,
    grads: Sequence[np.ndarray | None],
    loss: float | None,
    dtype: np.dtype[Any],
) -> tuple[list[np.ndarray | None], float | None]:
    """The sums with one more micro-batch in (new arrays; ``acc`` is left as it is)."""
    scale = _scale(spec, dtype)
    out: list[np.ndarray | None] = []
    # A sum of finite gradients may overflow: the step on it is then non-finite (skipped
    # or refused per ``nonfinite``), as torch's accumulated grad would be.
    with np.errstate(over="ignore", invalid="ignore"):
        return _added(scale, spec, acc, grads, loss, out)


def _added(
    scale: Any,
    spec: AccumulateSpec,
    acc: Accumulated,
    grads: Sequence[np.ndarray | None],
    loss: float | None,
    out: list[np.ndarray | None],
) -> tuple[list[np.ndarray | None], float | None]:
    for i, g in enumerate(grads):
        previous = acc.sums.get(i)
        if g is None:
            out.append(None if previous is None else previous.copy())
            continue
        term = g * scale if scale is not None else np.array(g, copy=True)
        out.append(term if previous is None else previous + term)
    total = acc.loss
    if loss is not None:
        term_loss = loss / spec.steps if spec.reduction == "mean" else loss
        total = term_loss if total is None else total + term_loss
    return out, total


def take(acc: Accumulated, sums: Sequence[np.ndarray | None], loss: float | None) -> None:
    """Keep ``sums`` (from :func:`added`) as the running sum, one more post counted."""
    acc.count += 1
    acc.sums = {i: s for i, s in enumerate(sums) if s is not None}
    acc.loss = loss


def reset(acc: Accumulated) -> None:
    acc.count = 0
    acc.sums = {}
    acc.loss = None


def to_flat(acc: Accumulated, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {f"{prefix}{i}": s for i, s in sorted(acc.sums.items())}
    return arrays, {"count": acc.count, "tensors": sorted(acc.sums), "loss": acc.loss}


def from_flat(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], prefix: str
) -> Accumulated:
    sums = {int(i): np.array(arrays[f"{prefix}{int(i)}"], copy=True) for i in meta["tensors"]}
    loss = meta.get("loss")
    return Accumulated(int(meta["count"]), sums, None if loss is None else float(loss))
