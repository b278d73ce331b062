"""The values that cross the sessions <-> API boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from service.codec import strict_json

Want = Literal["delta", "params", "none"]
WANTS: tuple[str, ...] = ("delta", "params", "none")


@dataclass(frozen=True)
class Limits:
    """Resource limits per tenant and per session (``LimitExceeded`` names the one hit)."""

    max_tensors_per_session: int = 1_000
    max_elements_per_session: int = 100_000_000
    max_sessions_per_tenant: int = 1_000


@dataclass(frozen=True)
class StepRequest:
    grads: dict[str, np.ndarray]
    params: dict[str, np.ndarray] | None = None
    loss: float | None = None
    idempotency_key: str | None = None
    fingerprint: str = ""
    """XXH3-128 of the body, its content type and the return mode (computed by the API)."""
    sha256_fingerprint: Callable[[], str] | None = None
    """The fingerprint servers before XXH3 recorded (sha256 of the same), computed only
    when a key recorded by one of them is retried."""
    if_match: int | None = None
    want: str = "delta"


@dataclass(frozen=True)
class StepReply:
    step: int
    lr: list[float]
    applied: bool
    evaluate: bool
    tensors: dict[str, np.ndarray] | None
    """Deltas or new params (per ``want``), or None for ``want="none"``."""
    replayed: bool = False
    """True when this is the stored reply to an earlier request with the same key."""
    skipped: str | None = None
    """Why the step was not applied (non-finite input with ``nonfinite: "skip"``)."""
    metrics: dict[str, float] | None = None
    """An applied step's ``grad_norm``, ``update_norm``, ``param_norm`` and ``loss``."""
    accumulated: int | None = None
    """With ``accumulate``: the micro-batches in the running sum after this post."""
    of: int | None = None
    """With ``accumulate``: how many micro-batches make one step."""


@dataclass(frozen=True)
class StepRecord:
    """One entry of a session's step history: an optimizer step, applied or skipped, or a
    skipped micro-batch of an accumulation."""

    seq: int
    """The event of the step (pages of the history are keyed by it)."""
    step: int
    """The session's step after it."""
    at: float
    lr: list[float]
    """The learning rate per group the step used."""
    applied: bool
    skipped: str | None
    metrics: dict[str, float] | None

    def document(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "step": self.step,
            "time": timestamp(self.at),
            "lr": list(self.lr),
            "applied": self.applied,
            "skipped": self.skipped,
            "metrics": self.metrics,
        }

    def to_json(self) -> list[Any]:
        return [self.seq, self.step, self.at, self.lr, self.applied, self.skipped, self.metrics]

    @functools.cached_property
    def json_text(self) -> str:
        """:meth:`to_json` as strict JSON text, made once: every snapshot writes the whole
        history (up to 10,000 records), and formatting it afresh each time cost a
        1k-parameter session more CPU than its steps between snapshots."""
        return strict_json.dumps(self.to_json())

    @classmethod
    def from_json(cls, raw: list[Any]) -> StepRecord:
        seq, step, at, lr, applied, skipped, metrics = raw
        return cls(
            int(seq),
            int(step),
            float(at),
            [float(x) for x in lr],
            bool(applied),
            None if skipped is None else str(skipped),
            None if metrics is None else {str(k): float(v) for k, v in metrics.items()},
        )


@dataclass(frozen=True)
class Change:
    """One entry of a session's change log: a group edit (one per field) or an added group
    (``field`` is ``"params"``, ``new`` the added tensor names)."""

    seq: int
    """The event that made the change (pages of the log are keyed by it)."""
    step: int
    """The session's step when it was made: it applies from the next step on."""
    group: int
    field: str
    old: Any
    new: Any
    at: float
    reason: str | None = None

    def document(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "step": self.step,
            "group": self.group,
            "field": self.field,
            "old": self.old,
            "new": self.new,
            "time": timestamp(self.at),
            "reason": self.reason,
        }

    def to_json(self) -> list[Any]:
        return [
            self.seq,
            self.step,
            self.group,
            self.field,
            self.old,
            self.new,
            self.at,
            self.reason,
        ]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Change:
        seq, step, group, field_, old, new, at, reason = raw
        return cls(int(seq), int(step), int(group), str(field_), old, new, float(at), reason)


def timestamp(unix: float) -> str:
    """RFC 3339 in UTC with milliseconds."""
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SessionInfo:
    """A consistent picture of a session between two steps."""

    id: str
    step: int
    lr: list[float]
    resolved: dict[str, Any]
    """``Plan.describe()``: the config with every default filled in."""
    param_groups: list[dict[str, Any]]
    """Every group with its tensor names and all its hyperparameters."""
    holds_params: bool
    needs_params: bool
    ask_tell: bool
    skipped_steps: int
    created_at: float
    updated_at: float
    labels: dict[str, str] = field(default_factory=dict)
    accumulated: int = 0
    """Micro-batches in the running sum of an accumulation (0 without one)."""
    damage: str | None = None
    """Why the session's stored history does not read back; None for a healthy one."""

    @property
    def etag(self) -> str:
        return f'"{self.step}"'

    def document(self) -> dict[str, Any]:
        """The session document of ``GET /v1/sessions/{id}`` (JSON-ready)."""
        r = self.resolved
        return {
            "id": self.id,
            "step": self.step,
            "lr": list(self.lr),
            "optimizer": r["optimizer"],
            "schedule": r["schedule"],
            "param_groups": self.param_groups,
            "tensors": r["params"],
            "holds_params": self.holds_params,
            "needs_params": self.needs_params,
            "ask_tell": self.ask_tell,
            "dtype": r["dtype"],
            "nonfinite": r["nonfinite"],
            "missing_grads": r["missing_grads"],
            "clip_grad_norm": r["clip_grad_norm"],
            "clip_grad_value": r["clip_grad_value"],
            "accumulate": r.get("accumulate"),
            "averaging": r.get("averaging"),
            "aggregation": r.get("aggregation"),
            "skipped_steps": self.skipped_steps,
            "accumulated": self.accumulated,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
            "labels": dict(self.labels),
            "health": "ok" if self.damage is None else "damaged",
            "damage": self.damage,
        }
