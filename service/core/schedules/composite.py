"""Schedules of schedules: SequentialLR (one after another) and ChainedScheduler (all at once).

Both take ``schedulers: [{"name": ..., <args>}, ...]``, resolved recursively with field
paths such as ``schedulers[1].gamma``. As in torch, every child is constructed first, in
order, on the same groups (each taking its own initial step), and then the composite.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Any, cast

from service.core.errors import InvalidHyperparameter, InvalidInput, UnknownName
from service.core.hparams import Arg
from service.core.schedules.base import Groups, get, register
from service.core.schedules.group_values import lrs_of
from service.core.schedules.lr_scheduler import LAST_EPOCH, State, TorchSchedule

MAX_DEPTH = 8
"""Nesting limit for composites inside composites (torch has none; a request must not
be able to exhaust the stack)."""

SCHEDULERS_DOC = 'list of schedule configs, each {"name": ..., <its arguments>}'


class Composite(TorchSchedule):
    """What SequentialLR and ChainedScheduler share: resolving and addressing children."""

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        config = super().resolve(given, where)
        config["schedulers"] = self._resolve_children(config["schedulers"], where)
        self.check_children(config, where)
        return config

    def _resolve_children(self, value: Any, where: str) -> list[dict[str, Any]]:
        field = f"{where}schedulers"
        if not isinstance(value, list):
            raise InvalidHyperparameter(field, f"{field} must be a {SCHEDULERS_DOC}", value)
        if where.count("schedulers[") >= MAX_DEPTH:
            raise InvalidHyperparameter(
                field, f"schedules may be nested at most {MAX_DEPTH} deep", value
            )
        if len(value) < 1:
            raise InvalidHyperparameter(field, self.empty_message, value)
        resolved = []
        for index, given in enumerate(value):
            path = f"{field}[{index}]."
            if not isinstance(given, Mapping):
                raise InvalidHyperparameter(
                    f"{field}[{index}]", f"{field}[{index}] must be an object", given
                )
            child = _child(given.get("name"), f"{path}name")
            if not isinstance(child, TorchSchedule):
                raise InvalidHyperparameter(
                    f"{path}name",
                    f"{self.name} does not support `ReduceLROnPlateau` scheduler as it "
                    "requires additional kwargs to be specified when calling `step`, "
                    f"but got one at index {index} in the given schedulers sequence.",
                    child.name,
                )
            args = {k: v for k, v in given.items() if k != "name"}
            resolved.append({"name": child.name, **child.resolve(args, path)})
        return resolved

    empty_message = ""

    def check_children(self, config: Mapping[str, Any], where: str) -> None:
        """Checks on the resolved children as a whole."""

    def children(
        self, config: Mapping[str, Any], state: State
    ) -> list[tuple[TorchSchedule, Mapping[str, Any], State]]:
        return [
            (_schedule(sub), sub, sub_state)
            for sub, sub_state in zip(config["schedulers"], state["schedulers"], strict=True)
        ]

    def begin_children(self, config: Mapping[str, Any], groups: Groups, where: str) -> list[State]:
        return [
            _schedule(sub).begin(sub, groups, f"{where}schedulers[{index}].")
            for index, sub in enumerate(config["schedulers"])
        ]

    def undo(self, config: Mapping[str, Any], state: State) -> None:
        # torch's recursive_undo walks into composites and only counts back leaves.
        for child, sub, sub_state in self.children(config, state):
            child.undo(sub, sub_state)

    def milestone_problem(
        self, config: Mapping[str, Any], where: str
    ) -> InvalidHyperparameter | None:
        return InvalidHyperparameter(
            f"{where}name",
            f"SequentialLR cannot switch to a {self.name} at a milestone "
            "(torch's _update_lr has no learning rate to compute for it)",
            self.name,
        )


class SequentialLR(Composite):
    """Runs ``schedulers[i]`` between ``milestones[i-1]`` and ``milestones[i]``.

    At a milestone the next schedule restarts with ``_update_lr(0)``, which takes its
    closed form where torch has one; at construction the lrs go back to ``initial_lr``,
    every child's constructor step is undone, and only the schedule for epoch 0 takes an
    initial step.
    """

    name = "SequentialLR"
    args = (
        Arg("schedulers", "any", None, SCHEDULERS_DOC, required=True),
        Arg(
            "milestones",
            "int_list",
            None,
            "epochs at which the next schedule takes over",
            required=True,
        ),
        LAST_EPOCH,
    )
    empty_message = "SequentialLR expects at least one scheduler, but got no scheduler."

    def check_children(self, config: Mapping[str, Any], where: str) -> None:
        schedulers, milestones = config["schedulers"], config["milestones"]
        if len(milestones) != len(schedulers) - 1:
            raise InvalidHyperparameter(
                f"{where}milestones",
                "Sequential Schedulers expects number of schedulers provided to be one more "
                f"than the number of milestone points, but got number of schedulers "
                f"{len(schedulers)} and the number of milestones to be equal to "
                f"{len(milestones)}",
                milestones,
            )
        for index, sub in enumerate(schedulers[1:], start=1):
            problem = _schedule(sub).milestone_problem(sub, f"{where}schedulers[{index}].")
            if problem is not None:
                raise problem

    def begin(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        state: State = {
            "last_epoch": config["last_epoch"] + 1,
            "schedulers": self.begin_children(config, groups, where),
        }
        for group in groups:
            group["lr"] = group["initial_lr"]
        self.undo(config, state)
        child, sub, sub_state = self.children(config, state)[bisect_right(config["milestones"], 0)]
        child.initial_step(sub, sub_state, groups)
        state["last_lr"] = list(sub_state["last_lr"])
        return state

    def advance(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> None:
        state["last_epoch"] += 1
        epoch, milestones = state["last_epoch"], config["milestones"]
        index = bisect_right(milestones, epoch)
        child, sub, sub_state = self.children(config, state)[index]
        if index > 0 and milestones[index - 1] == epoch:
            try:
                child.restart(sub, sub_state, groups)
            except InvalidInput as exc:
                raise InvalidInput(
                    f"SequentialLR cannot switch to {child.name} at milestone {epoch}: {exc}",
                    exc.field,
                ) from exc
        else:
            child.advance(sub, sub_state, groups, initial=False)
        state["last_lr"] = list(sub_state["last_lr"])


class ChainedScheduler(Composite):
    """Steps every schedule in ``schedulers``, in order, at each step; their factors compose."""

    name = "ChainedScheduler"
    args = (Arg("schedulers", "any", None, SCHEDULERS_DOC, required=True),)
    empty_message = (
        "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler."
    )

    def begin(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        # torch's ChainedScheduler never calls LRScheduler.__init__: no initial step.
        states = self.begin_children(config, groups, where)
        return {"schedulers": states, "last_lr": lrs_of(groups)}

    def advance(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> None:
        for child, sub, sub_state in self.children(config, state):
            child.advance(sub, sub_state, groups, initial=False)
        state["last_lr"] = lrs_of(groups)


def _child(name: Any, field: str) -> Any:
    if not isinstance(name, str):
        raise InvalidHyperparameter(field, f"{field} must be a schedule name", name)
    try:
        return get(name)
    except UnknownName as exc:
        raise InvalidHyperparameter(field, str(exc), name) from exc


def _schedule(sub: Mapping[str, Any]) -> TorchSchedule:
    """The schedule of a resolved child config (resolution checked it is nestable)."""
    return cast(TorchSchedule, get(sub["name"]))


register(SequentialLR())
register(ChainedScheduler())
