"""Param groups that change while a session runs: ``add_param_group`` and hand edits.

A torch training loop may call ``optimizer.add_param_group(...)`` after its scheduler was
created (unfreezing layers) and may rewrite ``param_groups[i]["lr"]`` (or ``momentum``,
``betas``, ``weight_decay``, ...) between steps. The schedule then keeps running on the
longer or edited groups, with torch's numbers: see ``docs/torch-compatibility.md``.

Both changes are checked before they are made, so that a session can log a change
durably between the check and the change: :func:`plan_edit` checks an edit and
:func:`apply_edit` makes it; :func:`check_groups` refuses groups the schedule could not
take its next step on (torch would raise there); :func:`check_add` checks an added group
and :func:`add_group` checks, then appends the group's hyperparameters and optimizer state to a
:class:`TrainState`. A refusal changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.core.errors import CoreError, InvalidHyperparameter, InvalidInput, UnknownArguments
from service.core.plan import Plan
from service.core.schedules.group_values import clone
from service.core.state import to_flat
from service.core.training import TrainState


def check_groups(plan: Plan, state: TrainState, groups: list[dict[str, Any]]) -> None:
    """Raise :class:`InvalidInput` if the session's schedule could not step on ``groups``.

    ``groups`` is what ``state.groups`` would become: a copy with a group appended, or
    with a hyperparameter edited. The check is a dry run of the schedule's next step on
    copies (:meth:`Schedule.check_groups`), so it refuses what torch's scheduler would
    raise at that step; nothing in ``state`` or ``groups`` changes.
    """
    spec = plan.schedule
    if spec is None:
        return
    assert state.schedule_state is not None
    spec.schedule.check_groups(spec.config, state.schedule_state, clone(groups))


def add_group(before: Plan, after: Plan, state: TrainState) -> None:
    """Append the param group that ``after`` adds to ``before`` to a running state.

    ``after`` is ``plan_from_config`` of ``before``'s config extended with the new tensors
    at the end of ``params`` and one more entry at the end of ``param_groups`` naming
    exactly them (pass ``schedule_groups=len(state.groups)``). Groups are ordered with
    the default group first, so the added group is always ``after.groups[-1]``.

    As torch's ``add_param_group`` does, the new group's hyperparameters are the
    optimizer's defaults (its config, not the values a schedule has since written into
    the other groups) with the entry's overrides, and nothing of the schedule's:
    no ``initial_lr``, no cycle bounds. Its optimizer state is fresh. Raises
    :class:`InvalidInput` (changing nothing) when ``after`` is not ``before`` plus one
    group of new tensors, or when the schedule could not take its next step with the
    group added (:func:`check_groups`).
    """
    check_add(before, after, state)
    added = after.groups[-1]
    hparams = dict(added.hparams)
    shapes = [after.tensors[i].shape for i in added.indices]
    # torch fills a new group's state lazily from the constructor's values, not the group's
    # (Adagrad's initial_accumulator_value), as its constructor does for the first groups.
    init = added.optimizer.init_hparams(hparams, added.constructor)
    opt_state = added.optimizer.init(shapes, init, after.dtype)
    state.groups.append(hparams)
    state.opt_states.append(opt_state)


def check_add(before: Plan, after: Plan, state: TrainState) -> None:
    """Everything :func:`add_group` checks, changing nothing."""
    _check_extends(before, after, state)
    check_groups(before, state, [*state.groups, dict(after.groups[-1].hparams)])


def _check_extends(before: Plan, after: Plan, state: TrainState) -> None:
    """``after`` must be ``before`` with new tensors appended, all in one new last group."""
    old = len(before.tensors)
    if len(state.groups) != len(before.groups) or len(state.opt_states) != len(before.groups):
        raise InvalidInput("the session state does not match its config's param groups")
    problem = None
    if len(after.groups) != len(before.groups) + 1:
        problem = f"{len(after.groups) - len(before.groups)} param groups added, expected 1"
    elif after.tensors[:old] != before.tensors or len(after.tensors) == old:
        problem = "the new group's tensors must be appended after the existing ones"
    elif [g.indices for g in after.groups[:-1]] != [g.indices for g in before.groups]:
        problem = "the existing param groups changed"
    elif sorted(after.groups[-1].indices) != list(range(old, len(after.tensors))):
        problem = "the new param group must hold exactly the new tensors"
    elif (
        after.optimizer is not before.optimizer
        or [g.optimizer for g in after.groups[:-1]] != [g.optimizer for g in before.groups]
        or after.dtype != before.dtype
    ):
        problem = "the optimizer and dtype stay as they are"
    elif _schedule_of(after) != _schedule_of(before):
        problem = "the schedule stays as it is"
    if problem is not None:
        raise InvalidInput(f"cannot add this param group: {problem}", "param_groups")


def _schedule_of(plan: Plan) -> tuple[str, Any, str, int] | None:
    spec = plan.schedule
    if spec is None:
        return None
    return (spec.schedule.name, spec.config, spec.interval, spec.every)


@dataclass(frozen=True)
class GroupEdit:
    """A checked edit of one group: the new values and the ones they replace."""

    index: int
    new: dict[str, Any]
    old: dict[str, Any]
    fresh_state: bool
    """The group has not stepped and the edit changes what state it keeps (``amsgrad``):
    its state is made again, as torch makes it lazily at the first step."""


def _hparams(plan: Plan, index: int, group: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's hyperparameters of a group (without what schedules add)."""
    args = plan.groups[index].optimizer.args
    return {a.name: group[a.name] for a in args if a.name in group}


def _layout(plan: Plan, index: int, hp: Mapping[str, Any]) -> Any:
    """What a group's state holds: its list lengths and every array's shape (Prodigy's
    ``slice_p`` and SOAP's ``merge_dims`` change shapes, not lengths)."""
    shapes = [plan.tensors[i].shape for i in plan.groups[index].indices]
    arrays, scalars = to_flat(plan.groups[index].optimizer.init(shapes, hp, plan.dtype))
    return scalars["__layout__"], {name: a.shape for name, a in arrays.items()}


def plan_edit(plan: Plan, state: TrainState, index: int, changes: Mapping[str, Any]) -> GroupEdit:
    """Check ``param_groups[index].update(changes)``; raises with torch's messages."""
    if not 0 <= index < len(state.groups):
        raise InvalidInput(
            f"param_groups[{index}] does not exist; the session has {len(state.groups)} "
            f"group{'s' if len(state.groups) != 1 else ''} (0 to {len(state.groups) - 1})",
            "index",
        )
    if not changes:
        raise InvalidInput("the edit changes nothing: name at least one hyperparameter", "body")
    optimizer = plan.groups[index].optimizer
    known = [a.name for a in optimizer.args]
    where = f"param_groups[{index}]."
    if "optimizer" in changes:
        # torch steps a param group with the optimizer that holds it, for good: moving it to
        # another one drops its state and is a new session's job.
        raise InvalidHyperparameter(
            f"{where}optimizer",
            f"param_groups[{index}] is stepped by {optimizer.name} for the session's "
            "lifetime; a group's optimizer cannot change: create a new session",
            changes["optimizer"],
        )
    for name in changes:
        if name not in known:
            raise InvalidHyperparameter(
                f"{where}{name}",
                f"{optimizer.name} has no hyperparameter {name!r}; a group has {', '.join(known)}",
                name,
            )
    current = _hparams(plan, index, state.groups[index])
    resolved = optimizer.resolve({**current, **changes}, where=where)
    probe = getattr(optimizer, "ask_tell", None)
    if probe is not None and probe(resolved) != probe(current):
        raise InvalidHyperparameter(
            f"{where}max_iter",
            "the edit would switch LBFGS between one evaluation per step and ask/tell "
            "(a line search or max_iter > 1); create a new session for that",
        )
    shapes = [plan.tensors[i].shape for i in plan.groups[index].indices]
    try:
        optimizer.check_shapes(shapes, resolved)
    except CoreError as exc:
        raise InvalidHyperparameter(f"{where}{next(iter(changes))}", str(exc)) from exc
    edited = [dict(g) for g in state.groups]
    edited[index].update(resolved)
    check_groups(plan, state, edited)
    fresh = _layout(plan, index, resolved) != _layout(plan, index, current)
    if fresh and state.step > 0:
        fields = ", ".join(sorted(changes))
        raise InvalidHyperparameter(
            f"{where}{next(iter(changes))}",
            f"changing {fields} after the first step changes the state {optimizer.name} "
            "keeps per tensor (torch fails at the next step of such a group); create a new "
            "session, or continue with the setting the group started with",
        )
    return GroupEdit(
        index,
        {k: resolved[k] for k in changes},
        {k: copy.deepcopy(state.groups[index].get(k)) for k in changes},
        fresh,
    )


def apply_edit(plan: Plan, state: TrainState, edit: GroupEdit) -> None:
    group = state.groups[edit.index]
    group.update(copy.deepcopy(edit.new))
    if edit.fresh_state:
        shapes = [plan.tensors[i].shape for i in plan.groups[edit.index].indices]
        planned = plan.groups[edit.index]
        init = planned.optimizer.init_hparams(
            _hparams(plan, edit.index, group), planned.constructor
        )
        state.opt_states[edit.index] = planned.optimizer.init(shapes, init, plan.dtype)


def in_added_group(exc: InvalidHyperparameter, config: Mapping[str, Any]) -> InvalidHyperparameter:
    """``exc`` raised for :func:`extended_config`'s output, its fields as the add request
    names them (``lr``, ``optimizer.name``, ``params``), not as the config's new entry
    (``param_groups[K].lr``), which the request never had and whose index is not the
    group's index in the session document."""
    prefix = f"param_groups[{len(config['param_groups']) - 1}]."

    def field(path: str) -> str:
        return path[len(prefix) :] if path.startswith(prefix) else path

    exc.argument = field(exc.argument)
    exc.args = (str(exc).replace(prefix, ""),)
    if isinstance(exc, UnknownArguments):
        exc.errors = [(field(f), message.replace(prefix, "")) for f, message in exc.errors]
    return exc


def extended_config(
    config: Mapping[str, Any], tensors: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The session config with ``tensors`` (name -> ``{"shape": [...]}``) added as a new
    last group with ``options``; :func:`service.core.plan.plan_from_config` checks it."""
    extended = copy.deepcopy(dict(config))
    params = extended.get("params")
    existing = params if isinstance(params, Mapping) else {}
    for name in tensors:
        if name in existing:
            raise InvalidHyperparameter(
                f"params.{name}",
                f"some parameters appear in more than one parameter group ({name!r} exists)",
                name,
            )
    if not tensors:
        raise InvalidHyperparameter("params", "the new group must name at least one tensor")
    extended["params"] = {**existing, **copy.deepcopy(dict(tensors))}
    groups = list(extended.get("param_groups") or [])
    groups.append({**copy.deepcopy(dict(options)), "params": list(tensors)})
    extended["param_groups"] = groups
    return extended
