"""One session in memory: its plan, training state and held parameters, and how a step
or a manual schedule step changes them.

Everything here is synchronous and runs on worker threads, under the session's lock. The
same code applies a live request and replays a logged event, which is what makes
recovery reproduce the acknowledged state bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import InvalidInput
from service.core.federated.rounds import Federation
from service.core.plan import Plan
from service.core.training import (
    TrainState,
    apply_step,
    current_lrs,
    schedule_step,
)
from service.sessions import checkpoint
from service.sessions.errors import ParamsRequired
from service.sessions.federated.errors import StepsNotAccepted
from service.sessions.models import WANTS, SessionInfo, StepReply
from service.sessions.store.base import SessionRecord


@dataclass
class Prepared:
    """A step's inputs, checked, cast to the session's dtype and ordered as the plan's."""

    grads: dict[str, np.ndarray]
    """What the log keeps: the gradients as received (cast), before any clipping."""
    sent_params: dict[str, np.ndarray] | None
    work_grads: list[np.ndarray]
    """What the update reads; copies when clipping scales them in place."""
    params: list[np.ndarray] | None
    """What the update reads: held or sent values, or None if the rule ignores them."""
    loss: float | None
    want: str


def _tensors(
    plan: Plan, given: Mapping[str, Any], what: str
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    names = {spec.name for spec in plan.tensors}
    for name in given:
        if name not in names:
            raise InvalidInput(
                f"{what} names unknown tensor {name!r}; the session's tensors are "
                f"{', '.join(sorted(names))}",
                f"{what}.{name}",
            )
    by_name: dict[str, np.ndarray] = {}
    ordered: list[np.ndarray] = []
    for spec in plan.tensors:
        if spec.name not in given:
            raise InvalidInput(f"{what} lacks tensor {spec.name!r}", f"{what}.{spec.name}")
        values = np.asarray(given[spec.name])
        if values.dtype.kind not in "fiu":
            raise InvalidInput(
                f"{what} {spec.name!r} must hold real numbers, not {values.dtype}",
                f"{what}.{spec.name}",
            )
        if values.shape != spec.shape:
            # A flat list of the right length is unambiguous (row-major order).
            if values.ndim == 1 and values.size == spec.size:
                values = values.reshape(spec.shape)
            else:
                raise InvalidInput(
                    f"{what} {spec.name!r} has shape {list(values.shape)}, "
                    f"expected {list(spec.shape)}",
                    f"{what}.{spec.name}",
                )
        # asarray, not ascontiguousarray: the latter turns a 0-d tensor into shape (1,).
        values = np.asarray(values, dtype=plan.dtype, order="C")
        by_name[spec.name] = values
        ordered.append(values)
    return by_name, ordered


def initial_params(plan: Plan, given: Mapping[str, Any]) -> list[np.ndarray]:
    """Initial values for a parameter-holding session: every tensor, finite, owned."""
    _, ordered = _tensors(plan, given, "params")
    held = []
    for spec, values in zip(plan.tensors, ordered, strict=True):
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise InvalidInput(f"params {spec.name!r} holds NaN or Inf", f"params.{spec.name}")
        held.append(np.array(values, copy=True))
    return held


class LiveSession:
    def __init__(
        self,
        record: SessionRecord,
        plan: Plan,
        state: TrainState,
        held: list[np.ndarray] | None,
        seq: int,
        updated_at: float,
        federation: Federation | None = None,
    ) -> None:
        self.record = record
        self.plan = plan
        self.state = state
        self.held = held
        self.seq = seq
        """How many events (steps and manual schedule steps) the store holds for this
        session; the service advances it once an event is durable."""
        self.updated_at = updated_at
        self.federation = federation
        """Aggregation state when the session takes client updates instead of steps."""
        self._resolved = plan.describe()
        if federation is not None:
            self._resolved["aggregation"] = federation.spec.describe()
        self._groups = plan.resolved_groups()

    # -- steps ---------------------------------------------------------------------------

    def prepare(
        self,
        grads: Mapping[str, Any],
        params: Mapping[str, Any] | None,
        loss: float | None,
        want: str,
    ) -> Prepared:
        """Check names, shapes and what the step needs; cast to the session's dtype.

        Changes nothing. Core checks the values themselves (finiteness) in :meth:`apply`.
        """
        if self.federation is not None:
            raise StepsNotAccepted(self.record.id)
        plan = self.plan
        if want not in WANTS:
            raise InvalidInput(f"return must be one of {', '.join(WANTS)}, got {want!r}", "return")
        grads_by_name, grads_list = _tensors(plan, grads, "grads")
        sent: dict[str, np.ndarray] | None = None
        sent_list: list[np.ndarray] | None = None
        if params is not None:
            if self.held is not None:
                raise InvalidInput(
                    "this session holds its parameters; do not send 'params'", "params"
                )
            sent, sent_list = _tensors(plan, params, "params")
        values = self.held if self.held is not None else sent_list
        if plan.needs_params and values is None:
            raise ParamsRequired(
                "this session's update reads parameter values (weight decay or a line "
                "search): send 'params' with each step, or create the session with initial "
                "values so that it holds them"
            )
        if want == "params" and values is None:
            raise ParamsRequired(
                "return=params needs parameter values: send 'params', or create the "
                "session with initial values"
            )
        update_params = values if plan.needs_params else None
        if loss is not None:
            if not isinstance(loss, int | float) or isinstance(loss, bool):
                raise InvalidInput(f"loss must be a number, got {loss!r}", "loss")
            loss = float(loss)
        # Finiteness and the rest of core's checks happen in apply(), before it changes
        # anything: a second pass over every gradient here would cost as much again.
        clips = plan.clip_grad_norm is not None or plan.clip_grad_value is not None
        work = [g.copy() for g in grads_list] if clips else grads_list
        return Prepared(grads_by_name, sent, work, update_params, loss, want)

    def apply(self, prepared: Prepared) -> StepReply:
        """Apply a prepared step; the reply carries what ``want`` asked for.

        Raises core's ``CoreError`` (non-finite input, a schedule that cannot advance)
        before changing anything.
        """
        plan = self.plan
        out = [np.empty(spec.shape, dtype=plan.dtype) for spec in plan.tensors]
        outcome = apply_step(
            plan, self.state, prepared.work_grads, prepared.params, out, prepared.loss
        )
        if outcome.applied and self.held is not None:
            for values, delta in zip(self.held, out, strict=True):
                values += delta
        tensors: dict[str, np.ndarray] | None = None
        if prepared.want == "delta":
            tensors = {spec.name: d for spec, d in zip(plan.tensors, out, strict=True)}
        elif prepared.want == "params":
            if self.held is not None:
                tensors = {s.name: v.copy() for s, v in zip(plan.tensors, self.held, strict=True)}
            else:
                assert prepared.sent_params is not None
                tensors = {
                    spec.name: prepared.sent_params[spec.name] + d
                    for spec, d in zip(plan.tensors, out, strict=True)
                }
        return StepReply(
            step=self.state.step,
            lr=current_lrs(self.state),
            applied=outcome.applied,
            evaluate=outcome.evaluate,
            tensors=tensors,
            skipped=outcome.reason,
        )

    def schedule(self, metric: float | None) -> None:
        """A manual ``scheduler.step(metric)``."""
        schedule_step(self.plan, self.state, None if metric is None else float(metric))

    # -- views ---------------------------------------------------------------------------

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.record.id,
            step=self.state.step,
            lr=current_lrs(self.state),
            resolved=self._resolved,
            param_groups=self._groups,
            holds_params=self.held is not None,
            needs_params=self.plan.needs_params,
            ask_tell=self.plan.ask_tell,
            skipped_steps=self.state.skipped,
            created_at=self.record.created_at,
            updated_at=self.updated_at,
            labels=dict(self.record.labels),
        )

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The session as a checkpoint, arrays live (copy before letting go of the lock)."""
        return checkpoint.export(
            self.plan,
            self.record.config,
            self.record.labels,
            self.state,
            self.held,
            self.federation,
        )

    def state_bytes(self) -> int:
        arrays, _ = self.checkpoint()
        return sum(a.nbytes for a in arrays.values())
