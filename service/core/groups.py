"""Changing a running optimizer's param groups, as a torch training loop does.

Two things a loop does to ``optimizer.param_groups`` between steps:

- it edits a group's hyperparameters (``param_groups[i]["lr"] = ...``, by hand or through
  any scheduler): the next step uses the new values, and a chainable schedule continues
  from them, since it reads the group's current ``lr`` as torch's does;
- it adds a group (``add_param_group``): the new tensors get the optimizer's constructor
  defaults under the group's own options, and fresh state. A running schedule is not told,
  as torch's schedulers are not (what each schedule then does to the new group is
  torch's behaviour, see :mod:`service.core.schedules`).

Each is planned first (checked, nothing changed) and then applied, so that a session can
record the change durably between the two and a refused change leaves no trace.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.plan import Plan
from service.core.state import to_flat
from service.core.training import TrainState


@dataclass(frozen=True)
class GroupEdit:
    """A checked edit of one group: the new values and the ones they replace."""

    index: int
    new: dict[str, Any]
    old: dict[str, Any]
    fresh_state: bool
    """The group has not stepped and the edit changes what state it keeps (``amsgrad``):
    its state is made again, as torch makes it lazily at the first step."""


def _hparams(plan: Plan, group: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer's hyperparameters of a group (without what schedules add)."""
    return {a.name: group[a.name] for a in plan.optimizer.args if a.name in group}


def _layout(plan: Plan, index: int, hp: Mapping[str, Any]) -> Any:
    shapes = [plan.tensors[i].shape for i in plan.groups[index].indices]
    _, scalars = to_flat(plan.optimizer.init(shapes, hp, plan.dtype))
    return scalars["__layout__"]


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
    known = [a.name for a in plan.optimizer.args]
    where = f"param_groups[{index}]."
    for name in changes:
        if name not in known:
            raise InvalidHyperparameter(
                f"{where}{name}",
                f"{plan.optimizer.name} has no hyperparameter {name!r}; a group has "
                f"{', '.join(known)}",
                name,
            )
    current = _hparams(plan, state.groups[index])
    resolved = plan.optimizer.resolve({**current, **changes}, where=where)
    probe = getattr(plan.optimizer, "ask_tell", None)
    if probe is not None and probe(resolved) != probe(current):
        raise InvalidHyperparameter(
            f"{where}max_iter",
            "the edit would switch LBFGS between one evaluation per step and ask/tell "
            "(a line search or max_iter > 1); create a new session for that",
        )
    fresh = _layout(plan, index, resolved) != _layout(plan, index, current)
    if fresh and state.step > 0:
        fields = ", ".join(sorted(changes))
        raise InvalidHyperparameter(
            f"{where}{next(iter(changes))}",
            f"changing {fields} after the first step changes the state {plan.optimizer.name} "
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
        state.opt_states[edit.index] = plan.optimizer.init(
            shapes, _hparams(plan, group), plan.dtype
        )


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


def add_group(plan_after: Plan, state: TrainState) -> None:
    """``add_param_group`` on a running state: ``plan_after`` is the session's plan with the
    new group last; it gets the defaults under its options and fresh optimizer state."""
    group = plan_after.groups[-1]
    if len(plan_after.groups) != len(state.groups) + 1:
        raise InvalidInput("the extended plan must add exactly one group", "param_groups")
    shapes = [plan_after.tensors[i].shape for i in group.indices]
    state.groups.append(dict(group.hparams))
    state.opt_states.append(plan_after.optimizer.init(shapes, group.hparams, plan_after.dtype))
