"""What a learning-rate schedule is in optserve.

A schedule mirrors one ``torch.optim.lr_scheduler`` class. Like torch's schedulers it acts
on the optimizer's parameter groups, here plain hyperparameter dicts: ``start`` does
what torch's constructor does (records ``initial_lr`` and applies the value for epoch 0),
``step`` does what ``scheduler.step()`` does. All of its position lives in a JSON-ready
state dict, so a restored session continues exactly where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from service.core.errors import UnknownName
from service.core.hparams import Arg, resolve
from service.core.schedules.group_values import clone

Groups = list[dict[str, Any]]
"""The optimizer's param groups' hyperparameters (``lr``, ``momentum``, ``betas``, ...)."""


class Schedule(ABC):
    """Base of every schedule definition. Subclasses are stateless singletons."""

    name: ClassVar[str]
    """torch's class name, e.g. ``"CosineAnnealingLR"``."""
    args: ClassVar[tuple[Arg, ...]]
    """Constructor arguments after ``optimizer``, with torch's defaults."""
    needs_metric: ClassVar[bool] = False
    """True for ReduceLROnPlateau: ``step`` needs the monitored value."""

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Defaults filled in, types checked, ranges validated with torch's messages."""
        config = resolve(self.args, given, where=where)
        self.validate(config, where)
        return config

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:  # noqa: B027
        """Range checks; override with torch's checks and messages."""

    @abstractmethod
    def start(self, config: Mapping[str, Any], groups: Groups) -> dict[str, Any]:
        """Construct: set up ``groups`` as torch's constructor does, return the state."""

    @abstractmethod
    def step(
        self,
        config: Mapping[str, Any],
        state: dict[str, Any],
        groups: Groups,
        metric: float | None = None,
    ) -> dict[str, Any]:
        """Advance once, as ``scheduler.step()``; rewrite ``groups`` and return the state."""

    def validate_groups(  # noqa: B027
        self, config: Mapping[str, Any], groups: Groups, where: str = ""
    ) -> None:
        """Checks that need the optimizer's groups (per-group lists, momentum or betas).

        Raises :class:`InvalidHyperparameter` with ``where``-prefixed field paths and changes
        nothing. ``start`` raises the same errors, without the prefix.
        """

    def check_step(
        self,
        config: Mapping[str, Any],
        state: dict[str, Any],
        groups: Groups,
        metric: float | None = None,
    ) -> None:
        """Raise :class:`InvalidInput` if ``step`` would fail (a OneCycleLR run past its
        ``total_steps``, a missing metric), changing nothing: a caller checks this before
        it mutates anything else, so a refused step is never half applied."""
        self.step(config, clone(state), clone(groups), metric)

    def check_groups(
        self, config: Mapping[str, Any], state: dict[str, Any], groups: Groups
    ) -> None:
        """Raise :class:`InvalidInput` if torch's scheduler could not take its next step on
        ``groups``: the session's groups with a param group appended (``add_param_group``)
        or a hyperparameter edited by hand, before the change is made. Changes nothing.

        It is a dry run of the next step on copies, so it refuses exactly where torch would
        raise at that step (CyclicLR, OneCycleLR and CosineAnnealingWarmRestarts compute one
        value per group they were created with; so does the closed form SequentialLR
        switches to at a milestone). A step that torch can take now but not later
        (CosineAnnealingLR's step after ``T_max``, a SequentialLR milestone further on) is
        refused when it comes, as torch raises there, and that refusal changes nothing either.
        """
        self.check_step(config, state, groups)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "args": [a.describe() for a in self.args],
            "needs_metric": self.needs_metric,
        }


_REGISTRY: dict[str, Schedule] = {}


def register(schedule: Schedule) -> Schedule:
    _REGISTRY[schedule.name.lower()] = schedule
    return schedule


def get(name: str) -> Schedule:
    """Look up a schedule by torch's class name, case-insensitively."""
    found = _REGISTRY.get(name.lower())
    if found is None:
        raise UnknownName("schedule", name, sorted(s.name for s in _REGISTRY.values()))
    return found


def all_schedules() -> list[Schedule]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)
