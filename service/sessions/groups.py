"""Group edits and added groups as session events (DESIGN.md 4a).

``PATCH .../param_groups/{index}`` and ``POST .../param_groups`` change a session the way a
torch loop changes ``optimizer.param_groups``. Each change is checked first (core plans
it, changing nothing), then logged as an event like a step, then applied; replaying the
event applies it again, so recovery and checkpoints carry every change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.sessions.live import AddedGroup, LiveSession
from service.sessions.store.base import Event

GROUP_EVENTS = ("edit", "add_group")


@dataclass(frozen=True)
class GroupEditRequest:
    index: int
    values: dict[str, Any]
    """Hyperparameter name -> new value."""
    reason: str | None = None
    if_match: int | None = None


@dataclass(frozen=True)
class AddGroupRequest:
    tensors: dict[str, Any]
    """Name -> ``{"shape": [...]}`` of each added tensor."""
    data: dict[str, np.ndarray] | None
    """Initial values of the added tensors (a session that holds its parameters)."""
    options: dict[str, Any]
    """The group's own hyperparameters (the rest are the optimizer's)."""
    reason: str | None = None
    if_match: int | None = None


@dataclass(frozen=True)
class PlannedAdd:
    """What applies a checked ``add_param_group``, and what it will add."""

    planned: AddedGroup
    apply: Callable[[], None]

    def __call__(self) -> None:
        self.apply()


def edit_event(
    live: LiveSession, request: GroupEditRequest, at: float
) -> tuple[Event, Callable[[], None]] | None:
    """The event of a checked edit, and what applies it (raises for a bad edit); None when
    it sets every value to what it is already (a retried edit changes nothing again)."""
    edit = live.plan_edit(request.index, request.values)
    if _jsonable(edit.new) == _jsonable(edit.old):
        return None
    seq = live.seq + 1
    event = Event(
        seq=seq,
        kind="edit",
        at=at,
        info={"group": edit.index, "set": _jsonable(edit.new), "reason": request.reason},
    )
    return event, lambda: live.apply_edit(edit, at, seq, request.reason)


def add_event(live: LiveSession, request: AddGroupRequest, at: float) -> tuple[Event, PlannedAdd]:
    """The event of a checked ``add_param_group``, and what applies it."""
    planned = live.plan_add(request.tensors, request.data, request.options)
    seq = live.seq + 1
    added = planned.plan.tensors[len(live.plan.tensors) :]
    event = Event(
        seq=seq,
        kind="add_group",
        at=at,
        params=(
            {spec.name: v for spec, v in zip(added, planned.values, strict=True)}
            if planned.values is not None
            else None
        ),
        info={"params": request.tensors, "options": request.options, "reason": request.reason},
    )
    return event, PlannedAdd(planned, lambda: live.apply_add(planned, at, seq, request.reason))


def replay_group_change(live: LiveSession, event: Event) -> None:
    """Apply a logged edit or added group again."""
    info: Mapping[str, Any] = event.info or {}
    reason = info.get("reason")
    if event.kind == "edit":
        edit = live.plan_edit(info["group"], info["set"])
        live.apply_edit(edit, event.at, event.seq, reason)
    else:
        planned = live.plan_add(info["params"], event.params, info["options"])
        live.apply_add(planned, event.at, event.seq, reason)


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
