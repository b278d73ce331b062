"""One optimizer step of a whole session: validation, clipping, groups, schedule.

This is the pure-numpy counterpart of a torch training loop's tail::

    clip_grad_value_ / clip_grad_norm_   (if configured)
    optimizer.step()
    scheduler.step()                     (per the schedule's interval and every)

``TrainState`` holds everything that changes; ``Plan`` everything that does not. Inputs are
checked before anything is mutated, so a rejected step leaves the state untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import accumulation, reductions
from service.core.accumulation import Accumulated
from service.core.clipping import clip_grad_norm, clip_grad_value
from service.core.errors import CoreError, InvalidHyperparameter, InvalidInput
from service.core.hparams import check, resolve
from service.core.optimizers.base import Shape
from service.core.partial import Parts, update_group
from service.core.plan import Plan, optimizer_instances
from service.core.state import from_flat, to_flat


@dataclass
class TrainState:
    step: int
    groups: list[dict[str, Any]]
    """Current hyperparameters per group, as the schedule left them (torch's param_groups)."""
    opt_states: list[Any]
    schedule_state: dict[str, Any] | None
    skipped: int = 0
    """Steps not applied because of non-finite input (``nonfinite: "skip"``)."""
    since_schedule: int = 0
    """Optimizer steps since the schedule last advanced (for ``every``)."""
    accumulated: Accumulated = field(default_factory=Accumulated)
    """The micro-batches posted towards the next step (``accumulate``)."""


@dataclass(frozen=True)
class StepOutcome:
    applied: bool
    evaluate: bool = False
    """LBFGS ask/tell: the loss and gradient are wanted at ``params + out`` next."""
    completed: bool = True
    """The step counter advanced (torch's ``step()`` returned)."""
    reason: str | None = None
    grad_norm: float | None = None
    """The gradients' total 2-norm before clipping, when 2-norm clipping (alone) computed it:
    callers that report it need not compute it again."""


def initial_state(plan: Plan) -> TrainState:
    """Fresh optimizer state, then the schedule's constructor applied to the groups."""
    groups = [dict(g.hparams) for g in plan.groups]
    opt_states = [
        g.optimizer.init(
            [plan.tensors[i].shape for i in g.indices],
            g.optimizer.init_hparams(g.hparams, g.constructor),
            plan.dtype,
        )
        for g in plan.groups
    ]
    schedule_state = None
    if plan.schedule is not None:
        schedule_state = plan.schedule.schedule.start(plan.schedule.config, groups)
    return TrainState(0, groups, opt_states, schedule_state)


def current_lrs(state: TrainState) -> list[float]:
    return [float(g["lr"]) for g in state.groups]


def _check_arrays(plan: Plan, arrays: Sequence[np.ndarray | None], what: str) -> None:
    if len(arrays) != len(plan.tensors):
        raise InvalidInput(f"expected {len(plan.tensors)} {what} tensors, got {len(arrays)}", what)
    for spec, a in zip(plan.tensors, arrays, strict=True):
        if a is None:
            continue
        if a.shape != spec.shape:
            raise InvalidInput(
                f"{what} {spec.name!r} has shape {list(a.shape)}, expected {list(spec.shape)}",
                f"{what}.{spec.name}",
            )
        if a.dtype != plan.dtype:
            raise InvalidInput(
                f"{what} {spec.name!r} has dtype {a.dtype}, expected {plan.dtype}",
                f"{what}.{spec.name}",
            )


def first_nonfinite(
    plan: Plan, arrays: Sequence[np.ndarray | None], squares: list[float | None] | None = None
) -> str | None:
    """Name of the first tensor holding NaN or Inf, or None. Absent tensors are skipped.

    min and max propagate NaN and expose Inf without allocating a mask the size of the
    tensor, which matters at 10M parameters.

    With ``squares``, each tensor's sum of squares (:func:`reductions.metric_sum_of_squares`,
    None for an absent one) is appended to it instead, and read first: a finite sum means
    every element is finite (NaN and Inf propagate through squares and sums), so the one
    pass that checks a gradient also gives its reported norm. A sum that overflowed
    (float64 values above 1e154) falls back to min and max.
    """
    for spec, a in zip(plan.tensors, arrays, strict=True):
        if squares is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                summed = None if a is None else reductions.metric_sum_of_squares(a)
            squares.append(summed)
            if summed is None or math.isfinite(summed):
                continue
        if a is not None and a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
            return spec.name
    return None


def _schedule_metric(plan: Plan, loss: float | None) -> None:
    if plan.schedule is None or plan.schedule.interval != "step":
        return
    if plan.schedule.schedule.needs_metric and loss is None:
        raise InvalidInput(
            f"{plan.schedule.schedule.name} advancing every step needs 'loss' with each step",
            "loss",
        )


def validate_step(
    plan: Plan,
    grads: Sequence[np.ndarray | None],
    params: Sequence[np.ndarray | None] | None,
    loss: float | None = None,
    reads_params: bool | None = None,
    grad_squares: list[float | None] | None = None,
) -> str | None:
    """Check a step's inputs without touching state. Returns the skip reason, if any.

    Raises :class:`InvalidInput` for anything that must be refused; returns a reason when
    non-finite gradients are to be skipped (``nonfinite: "skip"``). ``grad_squares``
    receives the gradients' sums of squares (see :func:`first_nonfinite`).
    """
    _check_arrays(plan, grads, "grads")
    if plan.missing_grads == "error" and any(g is None for g in grads):
        missing = next(s.name for s, g in zip(plan.tensors, grads, strict=True) if g is None)
        raise InvalidInput(f"grads lacks tensor {missing!r}", f"grads.{missing}")
    if (plan.needs_params if reads_params is None else reads_params) and params is None:
        raise InvalidInput("this optimizer's update reads parameter values: send 'params'")
    if params is not None:
        _check_arrays(plan, params, "params")
        bad_param = first_nonfinite(plan, params)
        if bad_param is not None:
            raise InvalidInput(f"params {bad_param!r} holds NaN or Inf", f"params.{bad_param}")
    if plan.ask_tell and loss is None:
        raise InvalidInput("LBFGS with a line search or max_iter > 1 needs 'loss'", "loss")
    if loss is not None and not np.isfinite(loss) and plan.nonfinite == "error":
        raise InvalidInput("loss is NaN or Inf", "loss")
    _schedule_metric(plan, loss)
    bad = first_nonfinite(plan, grads, grad_squares)
    if bad is None and (loss is None or np.isfinite(loss)):
        return None
    reason = f"grads {bad!r} hold NaN or Inf" if bad is not None else "loss is NaN or Inf"
    if plan.nonfinite == "error":
        raise InvalidInput(reason, f"grads.{bad}" if bad is not None else "loss")
    return reason


def needs_params(plan: Plan, state: TrainState) -> bool:
    """Whether a step reads parameter values, with the groups' current hyperparameters
    (an edit may turn weight decay on or off)."""
    return plan.ask_tell or any(
        g.optimizer.needs_params(hp) for g, hp in zip(plan.groups, state.groups, strict=True)
    )


def check_step(
    plan: Plan,
    state: TrainState,
    grads: Sequence[np.ndarray | None],
    params: Sequence[np.ndarray | None] | None,
    loss: float | None = None,
    grad_squares: list[float | None] | None = None,
) -> str | None:
    """Everything :func:`apply_step` checks, changing nothing (``grad_squares``: see
    :func:`validate_step`).

    Raises :class:`InvalidInput` for a step that must be refused (including a schedule that
    cannot advance, OneCycleLR past ``total_steps``); returns why the step is to be skipped
    (non-finite input with ``nonfinite: "skip"``), or None. A caller that must record a
    step durably before applying it checks it first, so that nothing recorded is refused.
    """
    reason = validate_step(plan, grads, params, loss, needs_params(plan, state), grad_squares)
    if reason is None:
        reason = _check_grads_fit(plan, state, grads)
    if reason is not None:
        return reason
    # A session's groups by index, as PATCH .../param_groups/{index} names them.
    for members in optimizer_instances(plan.groups):
        plan.groups[members[0]].optimizer.check_groups(
            [state.groups[i] for i in members], [f"param_groups[{i}]." for i in members]
        )
    spec = plan.schedule
    if spec is not None and spec.interval == "step" and state.since_schedule + 1 >= spec.every:
        assert state.schedule_state is not None
        spec.schedule.check_step(spec.config, state.schedule_state, state.groups, loss)
    return None


def _check_grads_fit(
    plan: Plan, state: TrainState, grads: Sequence[np.ndarray | None]
) -> str | None:
    """Refuse (or skip, as non-finite input) finite gradients a rule cannot take
    (:meth:`Optimizer.grads_to_check`: SOAP's statistics overflowing at a tensor's first
    gradient), looking at them as clipping will leave them, on copies."""
    wanted = [
        (gi, list(g.optimizer.grads_to_check(state.opt_states[gi])))
        for gi, g in enumerate(plan.groups)
    ]
    wanted = [
        (gi, ks)
        for gi, ks in wanted
        if any(grads[plan.groups[gi].indices[k]] is not None for k in ks)
    ]
    if not wanted:
        return None
    seen = [None if g is None else g.copy() for g in grads]
    _clip(plan, [g for g in seen if g is not None])
    for gi, ks in wanted:
        group = plan.groups[gi]
        for k in ks:
            i = group.indices[k]
            grad = seen[i]
            why = (
                ""
                if grad is None
                else group.optimizer.check_grad(k, grad, state.opt_states[gi], state.groups[gi])
            )
            if why:
                name = plan.tensors[i].name
                reason = f"grads {name!r} {why}"
                if plan.nonfinite == "error":
                    raise InvalidInput(reason, f"grads.{name}")
                return reason
    return None


def _clip(plan: Plan, present: Sequence[np.ndarray]) -> float | None:
    """The session's clipping of the gradients given, in place, as torch's utilities clip
    them; the 2-norm they had when clipping computes it."""
    # With no gradient at all torch's clipping does nothing (and returns a norm of 0).
    if plan.clip_grad_value is not None and present:
        clip_grad_value(present, plan.clip_grad_value["clip_value"])
    if plan.clip_grad_norm is not None and present:
        clip = plan.clip_grad_norm
        clipped = clip_grad_norm(present, clip["max_norm"], clip["norm_type"])
        if plan.clipping_computes_grad_norm:
            return clipped
    return None


def apply_step(
    plan: Plan,
    state: TrainState,
    grads: Sequence[np.ndarray | None],
    params: Sequence[np.ndarray | None] | None,
    out: Sequence[np.ndarray],
    loss: float | None = None,
) -> StepOutcome:
    """Validate, clip (scaling ``grads`` in place), update every group, advance the schedule.

    ``out`` receives each tensor's delta. On a skipped step ``out`` is zeroed. A ``None``
    gradient (``missing_grads: "skip"``) is a tensor torch leaves out of ``step()``: its
    state does not move and its delta is zero (see :mod:`service.core.partial`); rules that
    keep one state over all tensors (LBFGS) read zeros for it, as torch's do.
    """
    reason = check_step(plan, state, grads, params, loss)
    return apply_checked(plan, state, grads, params, out, loss, reason)


def apply_checked(
    plan: Plan,
    state: TrainState,
    grads: Sequence[np.ndarray | None],
    params: Sequence[np.ndarray | None] | None,
    out: Sequence[np.ndarray],
    loss: float | None,
    reason: str | None,
) -> StepOutcome:
    """:func:`apply_step` of inputs :func:`check_step` accepted, with its ``reason``."""
    if reason is not None:
        state.skipped += 1
        for d in out:
            d.fill(0)
        return StepOutcome(applied=False, completed=False, reason=reason)
    if not plan.per_tensor_state:
        grads = [
            np.zeros(t.shape, plan.dtype) if g is None else g
            for t, g in zip(plan.tensors, grads, strict=True)
        ]
    grad_norm = _clip(plan, [g for g in grads if g is not None])
    evaluate, completed = False, True
    metric = loss
    for members in optimizer_instances(plan.groups):
        if plan.groups[members[0]].optimizer.whole_step:
            _update_whole(plan, state, members, grads, params, out)
    for gi, group in enumerate(plan.groups):
        if group.optimizer.whole_step:
            continue  # stepped with the other groups of its optimizer, above
        g = [grads[i] for i in group.indices]
        p = [params[i] for i in group.indices] if params is not None else None
        o = [out[i] for i in group.indices]
        hp = state.groups[gi]
        if plan.ask_tell:
            assert loss is not None
            told = plan.optimizer.tell(loss, g, state.opt_states[gi], p, hp, o)  # type: ignore[attr-defined]
            evaluate, completed = bool(told.evaluate), bool(told.completed)
            if told.loss is not None:
                # torch's idiom is scheduler.step(optimizer.step(closure)): the metric is
                # what step() returns, the loss of its first closure call.
                metric = told.loss
        else:
            shapes = [plan.tensors[i].shape for i in group.indices]
            stepped = tuple(k for k, grad in enumerate(g) if grad is not None)
            state.opt_states[gi] = update_group(
                group.optimizer,
                shapes,
                state.opt_states[gi],
                stepped,
                g,
                p,
                hp,
                o,
            )
    if not completed:
        return StepOutcome(applied=True, evaluate=evaluate, completed=False, grad_norm=grad_norm)
    return _completed(plan, state, metric, grad_norm, evaluate)


def _update_whole(
    plan: Plan,
    state: TrainState,
    members: Sequence[int],
    grads: Sequence[np.ndarray | None],
    params: Sequence[np.ndarray | None] | None,
    out: Sequence[np.ndarray],
) -> None:
    """The groups ``members`` of one optimizer in one call, missing gradients as None
    (:attr:`Optimizer.whole_step`)."""
    indices = [plan.groups[gi].indices for gi in members]
    for ix in indices:
        for i in ix:
            if grads[i] is None:
                out[i].fill(0)  # the rule leaves a tensor without a gradient where it is
    stepped = plan.groups[members[0]].optimizer.update_groups(
        [[grads[i] for i in ix] for ix in indices],
        [state.opt_states[gi] for gi in members],
        [None if params is None else [params[i] for i in ix] for ix in indices],  # type: ignore[misc]
        [state.groups[gi] for gi in members],
        [[out[i] for i in ix] for ix in indices],
    )
    for gi, record in zip(members, stepped, strict=True):
        state.opt_states[gi] = record


def _completed(
    plan: Plan,
    state: TrainState,
    metric: float | None,
    grad_norm: float | None,
    evaluate: bool = False,
) -> StepOutcome:
    """Count a completed step and advance a per-step schedule."""
    state.step += 1
    if plan.schedule is not None and plan.schedule.interval == "step":
        state.since_schedule += 1
        if state.since_schedule >= plan.schedule.every:
            state.since_schedule = 0
            _advance(plan, state, metric)
    return StepOutcome(applied=True, evaluate=evaluate, completed=True, grad_norm=grad_norm)


def _advance(plan: Plan, state: TrainState, metric: float | None) -> None:
    assert plan.schedule is not None and state.schedule_state is not None
    state.schedule_state = plan.schedule.schedule.step(
        plan.schedule.config, state.schedule_state, state.groups, metric
    )


def check_schedule_step(plan: Plan, state: TrainState, metric: float | None) -> None:
    """Everything :func:`schedule_step` checks, changing nothing."""
    if plan.schedule is None:
        raise InvalidInput("this session has no schedule", "schedule")
    if plan.schedule.interval != "manual":
        raise InvalidInput(
            "this session's schedule advances with every step; create it with "
            '"interval": "manual" to step it by hand',
            "schedule.interval",
        )
    if plan.schedule.schedule.needs_metric and metric is None:
        raise InvalidInput(f"{plan.schedule.schedule.name} needs 'metric'", "metric")
    if metric is not None and not np.isfinite(metric):
        raise InvalidInput("metric is NaN or Inf", "metric")
    assert state.schedule_state is not None
    plan.schedule.schedule.check_step(
        plan.schedule.config, state.schedule_state, state.groups, metric
    )


def schedule_step(plan: Plan, state: TrainState, metric: float | None) -> None:
    """Advance a ``manual`` schedule once (a per-epoch ``scheduler.step(metric)``)."""
    check_schedule_step(plan, state, metric)
    _advance(plan, state, metric)


def preview(plan: Plan, steps: int, metrics: Sequence[float] | None = None) -> list[list[float]]:
    """The lr of every group before each of ``steps`` optimizer steps, from a fresh start."""
    groups = [dict(g.hparams) for g in plan.groups]
    spec = plan.schedule
    lrs: list[list[float]] = []
    if spec is None:
        return [[float(g["lr"]) for g in groups] for _ in range(steps)]
    if spec.schedule.needs_metric and (metrics is None or len(metrics) < steps):
        raise InvalidInput(f"previewing {spec.schedule.name} needs one metric per step", "metrics")
    sched_state = spec.schedule.start(spec.config, groups)
    for n in range(steps):
        lrs.append([float(g["lr"]) for g in groups])
        if (n + 1) % spec.every == 0:
            metric = metrics[n] if metrics is not None else None
            sched_state = spec.schedule.step(spec.config, sched_state, groups, metric)
    return lrs


def state_to_flat(plan: Plan, state: TrainState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every state array under ``state/group<i>/...`` plus the JSON rest.

    A group split by partial steps keeps each part under ``state/group<i>/part<k>/``, and
    its JSON entry is ``{"parts": [{"positions": [...], "state": {...}}, ...]}``.
    """
    arrays: dict[str, np.ndarray] = {}
    scalars: list[dict[str, Any]] = []
    for gi, record in enumerate(state.opt_states):
        prefix = f"state/group{gi}/"
        if isinstance(record, Parts):
            parts = []
            for k, (positions, part) in enumerate(record.parts):
                a, s = to_flat(part, prefix=f"{prefix}part{k}/")
                arrays.update(a)
                parts.append({"positions": list(positions), "state": s})
            scalars.append({"parts": parts})
        else:
            a, s = to_flat(record, prefix=prefix)
            arrays.update(a)
            scalars.append(s)
    acc_arrays, acc_meta = accumulation.to_flat(state.accumulated, ACCUMULATED_PREFIX)
    arrays.update(acc_arrays)
    meta = {
        "accumulated": acc_meta,
        "step": state.step,
        "groups": [_plain(g) for g in state.groups],
        "optimizer_state": scalars,
        "schedule_state": copy.deepcopy(state.schedule_state),
        "skipped": state.skipped,
        "since_schedule": state.since_schedule,
    }
    return arrays, meta


ACCUMULATED_PREFIX = "state/accumulated/"
"""Checkpoint arrays of the running sum of an accumulation, by tensor index."""


def _accumulated_from_flat(
    plan: Plan, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> Accumulated:
    if "accumulated" not in meta:
        return Accumulated()
    acc = accumulation.from_flat(arrays, meta["accumulated"], ACCUMULATED_PREFIX)
    for i, values in acc.sums.items():
        if not 0 <= i < len(plan.tensors) or values.shape != plan.tensors[i].shape:
            raise InvalidInput(f"checkpoint accumulated tensor {i} does not fit", "state")
    if acc.count and (plan.accumulate is None or acc.count >= plan.accumulate.steps):
        raise InvalidInput("checkpoint accumulation count does not fit the config", "state")
    return acc


def _group_from_flat(
    plan: Plan, gi: int, arrays: dict[str, np.ndarray], scalars: dict[str, Any]
) -> Any:
    cls, prefix = plan.groups[gi].optimizer.state_type, f"state/group{gi}/"
    if "parts" not in scalars:
        return from_flat(cls, arrays, scalars, prefix=prefix)
    size = len(plan.groups[gi].indices)
    parts = [
        (
            tuple(int(p) for p in entry["positions"]),
            from_flat(cls, arrays, entry["state"], prefix=f"{prefix}part{k}/"),
        )
        for k, entry in enumerate(scalars["parts"])
    ]
    covered = sorted(p for positions, _ in parts for p in positions)
    if covered != list(range(size)) or not plan.groups[gi].optimizer.per_tensor_state:
        raise InvalidInput(f"checkpoint state of group {gi} does not cover its tensors", "state")
    return Parts(parts)


def _fresh_record(
    plan: Plan, gi: int, hp: Mapping[str, Any], positions: Sequence[int] | None = None
) -> Any:
    """:meth:`Optimizer.init`'s record for group ``gi`` (or its tensors at ``positions``)
    with the hyperparameters ``hp``."""
    group = plan.groups[gi]
    shapes = [plan.tensors[i].shape for i in group.indices]
    if positions is not None:
        shapes = [shapes[p] for p in positions]
    init_hp = group.optimizer.init_hparams(hp, group.constructor)
    return group.optimizer.init(shapes, init_hp, plan.dtype)


def _check_restored(plan: Plan, gi: int, record: Any, hp: Mapping[str, Any]) -> None:
    """A checkpoint's record (or each part of it) keeps the arrays its rule keeps with the
    group's hyperparameters ``hp`` (SOAP's count of bases, say; LBFGS's history varies)
    and scalars it can step on."""
    optimizer = plan.groups[gi].optimizer
    whole = tuple(range(len(plan.groups[gi].indices)))
    parts = record.parts if isinstance(record, Parts) else [(whole, record)]
    # The arrays were made with the hyperparameters of the first step; a schedule may have
    # moved what it writes since (CyclicLR cycling SGD's momentum to 0 leaves its buffers),
    # so either the current values or those with the planned lr, momentum and beta1 fit.
    as_made = _with_planned_schedule_values(plan, gi, hp)
    for positions, part in parts:
        fresh = _fresh_record(plan, gi, hp, positions)
        why = optimizer.check_restored(part, fresh)
        shapes = _array_shapes(part)
        if (
            optimizer.per_tensor_state
            and shapes != _array_shapes(fresh)
            and shapes != _array_shapes(_fresh_record(plan, gi, as_made, positions))
        ):
            why = "its arrays are not those its hyperparameters keep"
        if why:
            raise InvalidInput(f"checkpoint state of group {gi}: {why}", "state")


def _with_planned_schedule_values(plan: Plan, gi: int, hp: Mapping[str, Any]) -> dict[str, Any]:
    """``hp`` with the values schedules write (lr, momentum, betas[0]) as the plan has them."""
    planned = plan.groups[gi].hparams
    made = {**hp, **{k: planned[k] for k in ("lr", "momentum") if k in hp and k in planned}}
    if "betas" in hp and "betas" in planned and len(hp["betas"]) == len(planned["betas"]):
        made["betas"] = (planned["betas"][0], *hp["betas"][1:])
    return made


def _array_shapes(record: Any) -> dict[str, Shape]:
    arrays, _ = to_flat(record)
    return {name: a.shape for name, a in arrays.items()}


def _restored_group(plan: Plan, gi: int, group: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters of group ``gi``, of the types and in the ranges the
    optimizer's constructor takes; but what schedules write (lr, and with cycle_momentum
    momentum or betas[0]) may have left those ranges as torch lets them (a OneCycleLR
    max_momentum above 1, an lr of 0 where Prodigy's constructor refuses 0): those are
    checked for type only, lr for being at least 0."""
    optimizer = plan.groups[gi].optimizer
    where = f"state.groups[{gi}]."
    known = {a.name for a in optimizer.args}
    typed = resolve(optimizer.args, {k: v for k, v in group.items() if k in known}, where=where)
    if "lr" in typed:
        check(typed["lr"] >= 0.0, f"{where}lr", f"lr must be at least 0, got {typed['lr']}")
    optimizer.validate(_with_planned_schedule_values(plan, gi, typed), where)
    try:
        optimizer.check_shapes([plan.tensors[i].shape for i in plan.groups[gi].indices], typed)
    except CoreError as exc:
        raise InvalidHyperparameter(f"{where}params", str(exc)) from exc
    return {**group, **typed}


def _plain(group: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}


def _group_hparams(plan: Plan, gi: int, raw: Any) -> dict[str, Any]:
    """A checkpoint's hyperparameters of group ``gi``, checked against the optimizer that
    steps it: a config naming another optimizer than the state's (Muon's group relabelled
    SGD) is refused here rather than failing inside the next step."""
    optimizer = plan.groups[gi].optimizer
    known = [a.name for a in optimizer.args]
    # Names only, not the constructor's range checks: a schedule may have moved a value
    # where the constructor would refuse it (CyclicLR cycling SGD's nesterov momentum to 0).
    if not isinstance(raw, dict) or any(name not in raw for name in known):
        raise InvalidInput(
            f"checkpoint state of group {gi} does not hold {optimizer.name}'s hyperparameters",
            "state",
        )
    return dict(raw)


def state_from_flat(plan: Plan, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TrainState:
    """Rebuild a state from :func:`state_to_flat`'s output, checked against the plan.

    Arrays are copied (they may be read-only views into a checkpoint's bytes) and must
    match what a fresh state of this plan has: same names, shapes and dtypes.
    """
    fresh = initial_state(plan)
    try:
        opt_scalars = meta["optimizer_state"]
        if len(opt_scalars) != len(plan.groups) or len(meta["groups"]) != len(plan.groups):
            raise InvalidInput("checkpoint groups do not match its config", "state")
        groups = [
            _restored_group(plan, gi, _group_hparams(plan, gi, g))
            for gi, g in enumerate(meta["groups"])
        ]
        # The state a group keeps follows its current hyperparameters: an edit before the
        # first step (amsgrad, slice_p) makes it again with the edited ones.
        fresh.opt_states = [_fresh_record(plan, gi, groups[gi]) for gi in range(len(groups))]
        fresh_arrays, _ = state_to_flat(plan, fresh)
        for name, a in arrays.items():
            ref = fresh_arrays.get(name)
            if a.dtype != plan.dtype or (ref is not None and ref.shape != a.shape):
                raise InvalidInput(f"checkpoint array {name!r} does not fit the config", name)
        owned = {k: np.array(v, copy=True) for k, v in arrays.items()}
        records = [
            _group_from_flat(plan, gi, owned, opt_scalars[gi]) for gi in range(len(plan.groups))
        ]
        for gi, record in enumerate(records):
            _check_restored(plan, gi, record, groups[gi])
        return TrainState(
            step=int(meta["step"]),
            groups=groups,
            opt_states=records,
            schedule_state=copy.deepcopy(meta["schedule_state"]),
            skipped=int(meta.get("skipped", 0)),
            since_schedule=int(meta.get("since_schedule", 0)),
            accumulated=_accumulated_from_flat(plan, owned, meta),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"checkpoint state is incomplete or malformed: {exc}", "state") from exc
