"""One session in memory: its plan, training state and held parameters, and how a step
or a manual schedule step changes them.

Everything here is synchronous and runs on worker threads, under the session's lock. The
same code applies a live request and replays a logged event, which is what makes
recovery reproduce the acknowledged state bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.buffers import STEP_BUFFERS
from service.core import accumulation, averaging
from service.core.clipping import total_norm_of_squares
from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.federated.rounds import Federation
from service.core.group_changes import (
    GroupEdit,
    add_group,
    apply_edit,
    check_add,
    extended_config,
    in_added_group,
    plan_edit,
)
from service.core.plan import Plan, TensorSpec, plan_from_config
from service.core.reductions import metric_sum_of_squares
from service.core.training import (
    TrainState,
    apply_checked,
    check_schedule_step,
    check_step,
    current_lrs,
    needs_params,
    schedule_step,
    validate_step,
)
from service.sessions import checkpoint
from service.sessions.errors import ParamsRequired
from service.sessions.federated import state as federated_state
from service.sessions.federated.errors import StepsNotAccepted
from service.sessions.models import WANTS, Change, SessionInfo, StepRecord, StepReply
from service.sessions.store.base import SessionRecord

MAX_CHANGES = 10_000
"""The change log keeps this many of the newest changes (a client-side scheduler that
edits lr before every step makes one per step); older ones are dropped from it."""

STEP_HISTORY = 10_000
"""The step history keeps this many of the newest records unless the server is told
otherwise (``OPTSERVE_STEP_HISTORY``)."""


@dataclass
class Prepared:
    """A step's inputs, checked, cast to the session's dtype and ordered as the plan's."""

    grads: dict[str, np.ndarray]
    """What the log keeps: the gradients as received (cast), before any clipping."""
    sent_params: dict[str, np.ndarray] | None
    work_grads: Sequence[np.ndarray | None]
    """What the update reads, None for a tensor left out; copies when clipping scales them
    in place."""
    params: Sequence[np.ndarray | None] | None
    """What the update reads: held or sent values, or None if the rule ignores them."""
    loss: float | None
    want: str
    steps: bool = True
    """Whether this post makes an optimizer step (without ``accumulate``, always; with it,
    the post that completes the running sum). Set by :meth:`LiveSession.check`."""
    sums: list[np.ndarray | None] | None = None
    """With ``accumulate``: the running sum with this post in (what the step reads)."""
    sum_loss: float | None = None
    grad_squares: list[float | None] | None = None
    """Each work gradient's sum of squares, taken by the finiteness check (None where a
    tensor is left out): the grad norm is computed from them, not by a second pass."""


def norm(arrays: Sequence[np.ndarray]) -> float:
    """A step metric's total 2-norm, as ``torch.nn.utils.clip_grad_norm_`` computes it (the
    norm of the per-tensor norms, each rounded to the dtype), from each tensor's
    :func:`~service.core.reductions.metric_sum_of_squares`; huge values overflow it to
    inf, as in torch."""
    if not arrays:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        squares = [metric_sum_of_squares(a) for a in arrays]
    return norm_of_squares(squares, arrays[0].dtype)


def norm_of_squares(squares: Sequence[float], dtype: np.dtype[Any]) -> float:
    """:func:`norm` from each tensor's sum of squares."""
    if not squares:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        return float(total_norm_of_squares(squares, dtype))


def checked_tensors(
    specs: Sequence[TensorSpec],
    dtype: np.dtype[Any],
    given: Mapping[str, Any],
    what: str,
    optional: bool = False,
) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
    """``given`` checked against ``specs``, cast to ``dtype``, in order. With ``optional``
    a tensor may be left out (its entry is None), as a partial step leaves it out."""
    names = {spec.name for spec in specs}
    for name in given:
        if name not in names:
            raise InvalidInput(
                f"{what} names unknown tensor {name!r}; the session's tensors are "
                f"{', '.join(sorted(names))}",
                f"{what}.{name}",
            )
    by_name: dict[str, np.ndarray] = {}
    ordered: list[np.ndarray | None] = []
    for spec in specs:
        if spec.name not in given:
            if optional:
                ordered.append(None)
                continue
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
        # A value past the dtype's range becomes Inf, which the check then refuses.
        with np.errstate(over="ignore"):
            values = np.asarray(values, dtype=dtype, order="C")
        by_name[spec.name] = values
        ordered.append(values)
    return by_name, ordered


def all_tensors(plan: Plan, given: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """Every tensor of the plan, checked and cast (:func:`checked_tensors`), by name."""
    by_name, _ = checked_tensors(plan.tensors, plan.dtype, given, what)
    return by_name


def initial_params(
    specs: Sequence[TensorSpec], dtype: np.dtype[Any], given: Mapping[str, Any]
) -> list[np.ndarray]:
    """Initial values of a parameter-holding session's tensors: every one, finite, owned."""
    by_name, _ = checked_tensors(specs, dtype, given, "params")
    held = []
    for spec in specs:
        values = by_name[spec.name]
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise InvalidInput(f"params {spec.name!r} holds NaN or Inf", f"params.{spec.name}")
        held.append(np.array(values, copy=True))
    return held


@dataclass(frozen=True)
class AddedGroup:
    """A checked ``add_param_group``: the session's next config and plan, new values."""

    config: dict[str, Any]
    plan: Plan
    values: list[np.ndarray] | None
    """Initial values of the added tensors, for a session that holds its parameters."""


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
        config: Mapping[str, Any] | None = None,
        changes: list[Change] | None = None,
        history: list[StepRecord] | None = None,
        average: averaging.Average | None = None,
    ) -> None:
        self.record = record
        self.plan = plan
        self.state = state
        self.held = held
        self.seq = seq
        """How many events (steps, schedule steps, group changes) the store holds for this
        session; the service advances it once an event is durable."""
        self.updated_at = updated_at
        self.federation = federation
        """Aggregation state when the session takes client updates instead of steps."""
        self.config: dict[str, Any] = dict(config if config is not None else record.config)
        """The config as it is now: the created one plus the groups added since."""
        self.changes: list[Change] = list(changes or [])
        """The audit trail of group edits and added groups, oldest first (bounded)."""
        self.history: list[StepRecord] = list(history or [])
        """The step history, oldest first, at most :attr:`history_limit` records."""
        self.history_limit = STEP_HISTORY
        if average is None and plan.averaging is not None and held is not None:
            average = averaging.begin(held)
        self.average = average
        """The averaged copy of the held params (``averaging``), or None."""
        self._describe()

    @classmethod
    def restored(
        cls, record: SessionRecord, restored: checkpoint.Restored, seq: int, updated_at: float
    ) -> LiveSession:
        """A session rebuilt from a checkpoint, as of its ``seq``-th event."""
        return cls(
            record,
            restored.plan,
            restored.state,
            restored.held,
            seq,
            updated_at,
            restored.federation,
            restored.config,
            restored.changes,
            restored.history,
            restored.average,
        )

    def _describe(self) -> None:
        self._resolved = self.plan.describe()
        if self.federation is not None:
            self._resolved["aggregation"] = self.federation.spec.describe()

    # -- steps ---------------------------------------------------------------------------

    def prepare(
        self,
        grads: Mapping[str, Any],
        params: Mapping[str, Any] | None,
        loss: float | None,
        want: str,
    ) -> Prepared:
        """Check names, shapes and what the step needs; cast to the session's dtype.

        Changes nothing. Core checks the values themselves (finiteness) in :meth:`check`.
        A session with ``missing_grads: "skip"`` takes a subset of its tensors; sent
        params then need to cover (at least) the tensors that have a gradient.
        """
        if self.federation is not None:
            raise StepsNotAccepted(self.record.id)
        plan = self.plan
        if want not in WANTS:
            raise InvalidInput(f"return must be one of {', '.join(WANTS)}, got {want!r}", "return")
        partial = plan.missing_grads == "skip"
        specs, dtype = plan.tensors, plan.dtype
        grads_by_name, grads_list = checked_tensors(specs, dtype, grads, "grads", partial)
        sent: dict[str, np.ndarray] | None = None
        values: Sequence[np.ndarray | None] | None = self.held
        if params is not None:
            if self.held is not None:
                raise InvalidInput(
                    "this session holds its parameters; do not send 'params'", "params"
                )
            sent, values = checked_tensors(specs, dtype, params, "params", partial)
            for spec, g, v in zip(plan.tensors, grads_list, values, strict=True):
                if g is not None and v is None:
                    raise InvalidInput(
                        f"params lacks tensor {spec.name!r}, which has a gradient",
                        f"params.{spec.name}",
                    )
        reads = needs_params(plan, self.state)
        if reads and values is None:
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
        if loss is not None:
            if not isinstance(loss, int | float) or isinstance(loss, bool):
                raise InvalidInput(f"loss must be a number, got {loss!r}", "loss")
            loss = float(loss)
        # Finiteness and the rest of core's checks happen in check(), in the one pass that
        # also gives each gradient's norm: a pass here would cost as much again.
        clips = plan.clip_grad_norm is not None or plan.clip_grad_value is not None
        work = [None if g is None else g.copy() for g in grads_list] if clips else grads_list
        return Prepared(grads_by_name, sent, work, values if reads else None, loss, want)

    def check(self, prepared: Prepared) -> str | None:
        """Core's checks of a prepared step, changing nothing in the session: raises core's
        ``CoreError`` (non-finite input, a schedule that cannot advance) for a step to
        refuse; returns why it is to be skipped (``nonfinite: "skip"``), or None.

        With ``accumulate`` a micro-batch is checked on its own (a non-finite one is
        refused, or skipped as if never posted); the post that completes the sum is then
        checked as the step on the sum. Marks ``prepared`` with what the post does.
        """
        plan, state = self.plan, self.state
        spec = plan.accumulate
        if spec is None:
            squares: list[float | None] = []
            reason = check_step(
                plan, state, prepared.work_grads, prepared.params, prepared.loss, squares
            )
            if len(squares) == len(prepared.work_grads):
                prepared.grad_squares = squares
            return reason
        reads = needs_params(plan, state)
        reason = validate_step(plan, prepared.work_grads, prepared.params, prepared.loss, reads)
        if reason is not None:
            prepared.steps = False
            return reason
        prepared.sums, prepared.sum_loss = accumulation.added(
            spec, state.accumulated, prepared.work_grads, prepared.loss, plan.dtype
        )
        prepared.steps = state.accumulated.count + 1 >= spec.steps
        if not prepared.steps:
            return None
        return check_step(plan, state, prepared.sums, prepared.params, prepared.sum_loss)

    def apply(self, prepared: Prepared, reason: str | None, seq: int, at: float) -> StepReply:
        """Apply a step :meth:`check` accepted (``reason`` is what it returned), as event
        ``seq`` made at ``at``; the reply carries what ``want`` asked for.

        The reply has a tensor for every tensor that had a gradient, and for every tensor
        when the rule moves them all (LBFGS reads zeros for a missing gradient and still
        moves the tensor, as torch's does). A post that only adds to an accumulation
        carries none.
        """
        plan, state = self.plan, self.state
        lrs = current_lrs(state)
        spec = plan.accumulate
        if spec is not None and not prepared.steps:
            if reason is None:
                assert prepared.sums is not None
                accumulation.take(state.accumulated, prepared.sums, prepared.sum_loss)
            else:
                state.skipped += 1
                self._remember(StepRecord(seq, state.step, at, lrs, False, reason, None))
            return StepReply(
                step=state.step,
                lr=lrs,
                applied=False,
                evaluate=False,
                tensors=None,
                skipped=reason,
                accumulated=state.accumulated.count,
                of=spec.steps,
            )
        grads: Sequence[np.ndarray | None] = prepared.work_grads
        loss = prepared.loss
        if spec is not None:
            assert prepared.sums is not None
            grads, loss = prepared.sums, prepared.sum_loss
            accumulation.reset(state.accumulated)
        # What clip_grad_norm_ returns: 2-norm clipping computes it (and reports it in the
        # outcome); otherwise it is taken here, before clipping scales the gradients.
        clipping_computes_it = plan.clipping_computes_grad_norm
        grad_norm = None
        if reason is None and not clipping_computes_it:
            squares = None if spec is not None else prepared.grad_squares
            if squares is None:
                grad_norm = norm([g for g in grads if g is not None])
            else:
                grad_norm = norm_of_squares([s for s in squares if s is not None], plan.dtype)
        # Large deltas reuse the buffers of earlier replies nothing holds any more.
        out = [STEP_BUFFERS.array(spec_.shape, plan.dtype) for spec_ in plan.tensors]
        outcome = apply_checked(plan, state, grads, prepared.params, out, loss, reason)
        if outcome.grad_norm is not None:
            grad_norm = outcome.grad_norm
        elif clipping_computes_it and outcome.applied:
            grad_norm = 0.0  # no gradient at all: clipping did nothing, torch's norm is 0
        every = not plan.per_tensor_state
        moved = [(i, t) for i, t in enumerate(plan.tensors) if every or grads[i] is not None]
        if outcome.applied and self.held is not None:
            for i, _ in moved:
                self.held[i] += out[i]
            avg, spec_avg = self.average, plan.averaging
            due = spec_avg is not None and outcome.completed and spec_avg.due(state.step)
            if avg is not None and spec_avg is not None and due:
                averaging.update(spec_avg, avg, self.held)
        metrics: dict[str, float] | None = None
        if outcome.applied:
            assert grad_norm is not None
            metrics = self._metrics(prepared, grad_norm, [out[i] for i, _ in moved], moved, out)
            if loss is not None:
                metrics["loss"] = float(loss)
        self._remember(
            StepRecord(seq, state.step, at, lrs, outcome.applied, outcome.reason, metrics)
        )
        tensors: dict[str, np.ndarray] | None = None
        if prepared.want == "delta":
            tensors = {t.name: out[i] for i, t in moved}
        elif prepared.want == "params":
            if self.held is not None:
                tensors = {t.name: self.held[i].copy() for i, t in moved}
            else:
                assert prepared.sent_params is not None
                tensors = {
                    t.name: prepared.sent_params[t.name] + out[i]
                    for i, t in moved
                    if t.name in prepared.sent_params
                }
        return StepReply(
            step=state.step,
            lr=current_lrs(state),
            applied=outcome.applied,
            evaluate=outcome.evaluate,
            tensors=tensors,
            skipped=outcome.reason,
            metrics=metrics,
            accumulated=0 if spec is not None else None,
            of=spec.steps if spec is not None else None,
        )

    def _metrics(
        self,
        prepared: Prepared,
        grad_norm: float,
        deltas: list[np.ndarray],
        moved: list[tuple[int, TensorSpec]],
        out: list[np.ndarray],
    ) -> dict[str, float]:
        """An applied step's norms; ``param_norm`` is of the parameters after the step."""
        metrics = {"grad_norm": grad_norm, "update_norm": norm(deltas)}
        if self.held is not None:
            metrics["param_norm"] = norm(self.held)
        elif prepared.sent_params is not None:
            moved_at = {t.name: i for i, t in moved}
            after = [
                values + out[moved_at[name]] if name in moved_at else values
                for name, values in prepared.sent_params.items()
            ]
            metrics["param_norm"] = norm(after)
        return metrics

    def _remember(self, record: StepRecord) -> None:
        self.history.append(record)
        if len(self.history) > self.history_limit:
            del self.history[: len(self.history) - self.history_limit]

    def check_schedule(self, metric: float | None) -> None:
        """Refuse a manual schedule step that cannot be made, changing nothing."""
        check_schedule_step(self.plan, self.state, None if metric is None else float(metric))

    def schedule(self, metric: float | None) -> None:
        """A manual ``scheduler.step(metric)``."""
        schedule_step(self.plan, self.state, None if metric is None else float(metric))

    # -- group edits and added groups ------------------------------------------------------

    def plan_edit(self, index: Any, changes: Mapping[str, Any]) -> GroupEdit:
        """Check an edit of ``param_groups[index]``; changes nothing."""
        if self.federation is not None:
            raise StepsNotAccepted(self.record.id)
        if not isinstance(index, int) or isinstance(index, bool):
            raise InvalidInput(f"a group index is an integer, got {index!r}", "index")
        return plan_edit(self.plan, self.state, index, changes)

    def apply_edit(self, edit: GroupEdit, at: float, seq: int, reason: str | None) -> None:
        apply_edit(self.plan, self.state, edit)
        for name, new in edit.new.items():
            self._record(
                Change(seq, self.state.step, edit.index, name, edit.old[name], new, at, reason)
            )

    def plan_add(
        self, tensors: Mapping[str, Any], data: Mapping[str, Any] | None, options: Mapping[str, Any]
    ) -> AddedGroup:
        """Check ``add_param_group``: the extended config and plan, the new tensors' values."""
        if self.federation is not None:
            raise StepsNotAccepted(self.record.id)
        if self.average is not None:
            raise InvalidInput(
                "a session that averages its weights takes no added groups: the average "
                "covers the tensors it was created with",
                "averaging",
            )
        config = extended_config(self.config, tensors, options)
        try:
            plan = plan_from_config(
                config, ignore=federated_state.OUTER_KEYS, schedule_groups=len(self.state.groups)
            )
        except InvalidHyperparameter as exc:
            raise in_added_group(exc, config) from None
        check_add(self.plan, plan, self.state)
        added = plan.tensors[len(self.plan.tensors) :]
        values: list[np.ndarray] | None = None
        if self.held is not None:
            if data is None:
                raise ParamsRequired(
                    "this session holds its parameters: give every added tensor its 'data'"
                )
            values = initial_params(added, plan.dtype, data)
        elif data is not None:
            raise InvalidInput(
                "this session does not hold its parameters; add tensors without 'data'",
                "params",
            )
        return AddedGroup(config, plan, values)

    def apply_add(self, added: AddedGroup, at: float, seq: int, reason: str | None) -> None:
        add_group(self.plan, added.plan, self.state)
        if self.held is not None:
            assert added.values is not None
            self.held.extend(np.array(v, copy=True) for v in added.values)
        self.plan, self.config = added.plan, added.config
        self._describe()
        index = len(self.state.groups) - 1
        names = [added.plan.tensors[i].name for i in added.plan.groups[-1].indices]
        self._record(Change(seq, self.state.step, index, "params", None, names, at, reason))

    def _record(self, change: Change) -> None:
        self.changes.append(change)
        if len(self.changes) > MAX_CHANGES:
            del self.changes[: len(self.changes) - MAX_CHANGES]

    # -- views ---------------------------------------------------------------------------

    def info(self) -> SessionInfo:
        groups = [
            {
                "params": [self.plan.tensors[i].name for i in group.indices],
                "optimizer": group.optimizer.name,
                **{
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in hp.items()
                    if k in {a.name for a in group.optimizer.args}
                },
            }
            for group, hp in zip(self.plan.groups, self.state.groups, strict=True)
        ]
        return SessionInfo(
            id=self.record.id,
            step=self.state.step,
            lr=current_lrs(self.state),
            resolved=self._resolved,
            param_groups=groups,
            holds_params=self.held is not None,
            needs_params=needs_params(self.plan, self.state),
            ask_tell=self.plan.ask_tell,
            skipped_steps=self.state.skipped,
            accumulated=self.state.accumulated.count,
            created_at=self.record.created_at,
            updated_at=self.updated_at,
            labels=dict(self.record.labels),
        )

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The session as a checkpoint, arrays live (copy before letting go of the lock)."""
        return checkpoint.export(
            self.plan,
            self.config,
            self.record.labels,
            self.state,
            self.held,
            self.federation,
            self.changes,
            self.history,
            self.average,
        )

    def state_bytes(self) -> int:
        arrays, _ = self.checkpoint()
        return sum(a.nbytes for a in arrays.values())
