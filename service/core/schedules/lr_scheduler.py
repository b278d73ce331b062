"""torch's ``LRScheduler`` protocol, on plain dicts.

Reproducing torch's numbers means reproducing its control flow, not just its closed
forms: the constructor's initial step (``_initial_step`` with ``_is_initial`` set), the
chainable ``get_lr`` recurrences that read the current ``group["lr"]``, ``last_epoch``
and ``_step_count``, ``_update_lr(epoch)`` choosing the closed form (which SequentialLR
relies on at milestones), and ``recursive_undo``. :class:`TorchSchedule` is that protocol
for every schedule that can be nested (all but ReduceLROnPlateau); :class:`LRSchedule`
is torch's ``LRScheduler`` base on top of it. What torch keeps in attributes lives in
the state dict (``last_epoch``, ``step_count``, ``base_lrs``, ``last_lr``, ...); what
torch writes into ``param_groups`` (``initial_lr``, ...) is written into the groups.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from service.core.errors import CoreError, InvalidHyperparameter, InvalidInput
from service.core.hparams import Arg
from service.core.schedules.base import Groups, Schedule
from service.core.schedules.group_values import check_count, clone, lrs_of

State = dict[str, Any]

LAST_EPOCH = Arg(
    "last_epoch",
    "int",
    -1,
    "index of the last epoch; -1 starts the schedule, other values resume it and need "
    "initial_lr in every group (set by an earlier schedule of a chain)",
)


@contextmanager
def _arithmetic_errors_as(error: Callable[[str], CoreError]) -> Iterator[None]:
    """Turn the arithmetic failures torch would raise (a zero division, an overflow)
    into a client error instead of letting them escape as a server fault."""
    try:
        yield
    except CoreError:
        raise
    except (ArithmeticError, ValueError) as exc:
        raise error(f"the schedule cannot be computed here: {exc}") from exc


class TorchSchedule(Schedule):
    """The protocol every nestable schedule follows (LRScheduler and the composites).

    ``begin`` is torch's constructor including its initial step; ``advance`` is
    ``step()`` (``initial`` is torch's ``_is_initial``); ``undo`` is what
    ``SequentialLR.recursive_undo`` does to it; ``restart`` is ``_update_lr(0)``, which
    SequentialLR calls on the schedule it switches to at a milestone.
    """

    @abstractmethod
    def begin(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        """torch's constructor: set up ``groups``, take the initial step, return the state."""

    @abstractmethod
    def advance(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> None:
        """torch's ``step()``."""

    @abstractmethod
    def undo(self, config: Mapping[str, Any], state: State) -> None:
        """``SequentialLR.recursive_undo``: take back the constructor's step count."""

    def restart(self, config: Mapping[str, Any], state: State, groups: Groups) -> None:
        """``_update_lr(0)``; only leaf schedules support it (see ``milestone_problem``)."""
        raise NotImplementedError(f"{self.name} cannot be restarted at a milestone")

    def milestone_problem(
        self, config: Mapping[str, Any], where: str
    ) -> InvalidHyperparameter | None:
        """Why SequentialLR could not switch to this schedule at a milestone, if it could not
        (torch would fail there, mid-training); checked when the session is created."""
        return None

    def initial_step(self, config: Mapping[str, Any], state: State, groups: Groups) -> None:
        """torch's ``_initial_step``: reset the step count and step in initial mode."""
        state["step_count"] = 0
        self.advance(config, state, groups, initial=True)

    def start(self, config: Mapping[str, Any], groups: Groups) -> State:
        with _arithmetic_errors_as(lambda m: InvalidHyperparameter("schedule", m)):
            work = clone(groups)
            state = self.begin(config, work, "")
        _write_back(groups, work)
        return state

    def validate_groups(self, config: Mapping[str, Any], groups: Groups, where: str = "") -> None:
        with _arithmetic_errors_as(lambda m: InvalidHyperparameter(where.rstrip("."), m)):
            self.begin(config, clone(groups), where)

    def step(
        self,
        config: Mapping[str, Any],
        state: State,
        groups: Groups,
        metric: float | None = None,
    ) -> State:
        # On copies, so that a step that fails half way (an overflow in a nested schedule)
        # leaves the state and the groups as they were.
        with _arithmetic_errors_as(lambda m: InvalidInput(m, "schedule")):
            work_state, work_groups = clone(state), clone(groups)
            self.advance(config, work_state, work_groups, initial=False)
        state.clear()
        state.update(work_state)
        _write_back(groups, work_groups)
        return state


def _write_back(groups: Groups, work: Groups) -> None:
    """Replace each group's contents in place: callers hold on to the group dicts."""
    for group, new in zip(groups, work, strict=True):
        group.clear()
        group.update(new)


class LRSchedule(TorchSchedule):
    """torch's ``LRScheduler``: subclasses give ``get_lr`` and maybe ``closed_form``."""

    has_closed_form: ClassVar[bool] = True
    """Whether torch's class defines ``_get_closed_form_lr`` (``_update_lr(epoch)`` uses it)."""

    def construct(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        """The part of a subclass constructor that runs before ``LRScheduler.__init__``."""
        return {}

    @abstractmethod
    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        """torch's chainable ``get_lr()``, reading ``state["last_epoch"]`` and the groups."""

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        """torch's ``_get_closed_form_lr()`` at ``state["last_epoch"]``."""
        raise NotImplementedError

    def begin(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        state = self.construct(config, groups, where)
        self.attach(config, state, groups, where)
        self.initial_step(config, state, groups)
        return state

    def attach(self, config: Mapping[str, Any], state: State, groups: Groups, where: str) -> None:
        """``LRScheduler.__init__`` up to the initial step: ``initial_lr`` and ``base_lrs``."""
        last_epoch = config["last_epoch"]
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise InvalidHyperparameter(
                        f"{where}last_epoch",
                        f"param 'initial_lr' is not specified in param_groups[{i}] when "
                        "resuming scheduler with last_epoch >= 0.",
                        last_epoch,
                    )
        state["base_lrs"] = [group["initial_lr"] for group in groups]
        state["last_epoch"] = last_epoch

    def advance(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> None:
        state["step_count"] += 1
        state["last_epoch"] += 1
        self.apply(state, groups, self.get_lr(config, state, groups, initial))

    def restart(self, config: Mapping[str, Any], state: State, groups: Groups) -> None:
        state["last_epoch"] = 0
        if self.has_closed_form:
            values = self.closed_form(config, state)
        else:
            values = self.get_lr(config, state, groups, initial=False)
        self.apply(state, groups, values)

    def undo(self, config: Mapping[str, Any], state: State) -> None:
        state["last_epoch"] -= 1

    def apply(self, state: State, groups: Groups, lrs: list[float]) -> None:
        """torch's ``_update_lr`` tail: one lr per param group (``zip(..., strict=True)``)."""
        check_count(self.name, lrs, groups)
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        state["last_lr"] = lrs_of(groups)
