"""Param groups that change while a session runs: ``add_param_group`` and hand edits.

A torch training loop may call ``optimizer.add_param_group(...)`` after its scheduler was
created (unfreezing layers) and may rewrite ``param_groups[i]["lr"]`` (or ``momentum``,
``betas``, ``weight_decay``, ...) between steps. The schedule then keeps running on the
longer or edited groups, with torch's numbers: see ``docs/torch-compatibility.md``.

Both changes are checked before they are made. :func:`check_groups` refuses groups the
schedule could not take its next step on (torch would raise there); :func:`add_group`
checks, then appends the group's hyperparameters and optimizer state to a
:class:`TrainState`. A refusal changes nothing.
"""

from __future__ import annotations

from typing import Any

from service.core.errors import InvalidInput
from service.core.plan import Plan
from service.core.schedules.group_values import clone
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
    _check_extends(before, after, state)
    added = after.groups[-1]
    hparams = dict(added.hparams)
    check_groups(before, state, [*state.groups, hparams])
    shapes = [after.tensors[i].shape for i in added.indices]
    opt_state = after.optimizer.init(shapes, hparams, after.dtype)
    state.groups.append(hparams)
    state.opt_states.append(opt_state)


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
    elif after.optimizer is not before.optimizer or after.dtype != before.dtype:
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
