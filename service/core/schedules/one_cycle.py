"""OneCycleLR: the 1cycle policy, warming up to ``max_lr`` and annealing far below the start."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import (
    check_momentum,
    float_or_list,
    per_group,
    set_momentum,
    start_momentum_cycle,
)
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State

PER_GROUP = "a float, or a list with one float per param group"

Phase = tuple[float, str, str, str, str]
"""end_step, start_lr key, end_lr key, start_momentum key, end_momentum key (group keys)."""


class OneCycleLR(LRSchedule):
    """Super-convergence's 1cycle (Smith & Topin, 2017), in two phases (fastai's) or three.

    Like torch, it keeps ``initial_lr``, ``max_lr``, ``min_lr`` (and ``max_momentum``,
    ``base_momentum``) in the groups and reads them back at every step. Stepping past
    ``total_steps`` is refused with torch's message.
    """

    name = "OneCycleLR"
    args = (
        Arg("max_lr", "any", None, f"peak learning rate: {PER_GROUP}", required=True),
        Arg("total_steps", "int", None, "steps in the cycle", nullable=True),
        Arg(
            "epochs",
            "int",
            None,
            "epochs, with steps_per_epoch instead of total_steps",
            nullable=True,
        ),
        Arg("steps_per_epoch", "int", None, "steps per epoch, with epochs", nullable=True),
        Arg("pct_start", "float", 0.3, "fraction of the cycle spent increasing the lr"),
        Arg("anneal_strategy", "str", "cos", "cos or linear"),
        Arg("cycle_momentum", "bool", True, "cycle momentum (or beta1) inversely to the lr"),
        Arg("base_momentum", "any", 0.85, f"momentum at the lr peak: {PER_GROUP}"),
        Arg("max_momentum", "any", 0.95, f"momentum at the start and end: {PER_GROUP}"),
        Arg("div_factor", "float", 25.0, "initial_lr = max_lr / div_factor"),
        Arg("final_div_factor", "float", 1e4, "min_lr = initial_lr / final_div_factor"),
        Arg("three_phase", "bool", False, "annihilate the lr in a third phase"),
        LAST_EPOCH,
    )
    has_closed_form = False

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        config = super().resolve(given, where)
        for name in ("max_lr", "base_momentum", "max_momentum"):
            config[name] = float_or_list(config, name, where)
        return config

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        total_steps, epochs, per_epoch = (
            config["total_steps"],
            config["epochs"],
            config["steps_per_epoch"],
        )
        if total_steps is not None:
            check(
                total_steps > 0,
                f"{where}total_steps",
                f"Expected positive integer total_steps, but got {total_steps}",
                total_steps,
            )
        elif epochs is not None and per_epoch is not None:
            check(
                epochs > 0,
                f"{where}epochs",
                f"Expected positive integer epochs, but got {epochs}",
                epochs,
            )
            check(
                per_epoch > 0,
                f"{where}steps_per_epoch",
                f"Expected positive integer steps_per_epoch, but got {per_epoch}",
                per_epoch,
            )
        else:
            raise InvalidHyperparameter(
                f"{where}total_steps",
                "You must define either total_steps OR (epochs AND steps_per_epoch)",
            )
        pct_start = config["pct_start"]
        check(
            0 <= pct_start <= 1,
            f"{where}pct_start",
            f"Expected float between 0 and 1 pct_start, but got {pct_start}",
            pct_start,
        )
        strategy = config["anneal_strategy"]
        check(
            strategy in ("cos", "linear"),
            f"{where}anneal_strategy",
            f"anneal_strategy must be one of 'cos' or 'linear', instead got {strategy}",
            strategy,
        )
        self._check_phases(config, where)

    def _check_phases(self, config: Mapping[str, Any], where: str) -> None:
        """Reject a phase of zero length that a step would land in: torch divides by the
        phase length there, mid-training. Only the first phase (at step 0) and the last
        (which, if any step reaches it, step ``total_steps`` does) can be both."""
        total = _total_steps(config)
        for step_num in (0, total):
            start, end = _phase_span(config, step_num)
            check(
                end != start,
                f"{where}pct_start",
                f"pct_start {config['pct_start']} with {total} total steps gives a phase of "
                f"zero length at step {step_num} (torch divides by its length there)",
                config["pct_start"],
            )

    def construct(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        last_epoch = config["last_epoch"]
        max_lrs = per_group("max_lr", config["max_lr"], groups, where)
        if last_epoch == -1:
            for max_lr, group in zip(max_lrs, groups, strict=True):
                group["initial_lr"] = max_lr / config["div_factor"]
                group["max_lr"] = max_lr
                group["min_lr"] = group["initial_lr"] / config["final_div_factor"]
        state: State = {}
        if config["cycle_momentum"]:
            check_momentum(groups, where)
            max_momentums = per_group("max_momentum", config["max_momentum"], groups, where)
            base_momentums = per_group("base_momentum", config["base_momentum"], groups, where)
            if last_epoch == -1:
                start_momentum_cycle(groups, max_momentums, base_momentums)
        return state

    def attach(self, config: Mapping[str, Any], state: State, groups: Groups, where: str) -> None:
        super().attach(config, state, groups, where)
        # A resumed 1cycle reads these group entries at every step.
        needed = ["max_lr", "min_lr"]
        if config["cycle_momentum"]:
            needed += ["max_momentum", "base_momentum"]
        for i, group in enumerate(groups):
            for key in needed:
                if key not in group:
                    raise InvalidHyperparameter(
                        f"{where}last_epoch",
                        f"param {key!r} is not specified in param_groups[{i}] when resuming "
                        "OneCycleLR with last_epoch >= 0",
                        config["last_epoch"],
                    )

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        step_num = state["last_epoch"]
        total_steps = _total_steps(config)
        if step_num > total_steps:
            raise InvalidInput(
                f"Tried to step {step_num} times. The specified number of total steps is "
                f"{total_steps}",
                "schedule",
            )
        anneal = _annealing_cos if config["anneal_strategy"] == "cos" else _annealing_linear
        phases = _phases(config)
        lrs = []
        for index, group in enumerate(groups):
            start_step = 0.0
            for i, (end_step, start_lr, end_lr, start_m, end_m) in enumerate(phases):
                if step_num <= end_step or i == len(phases) - 1:
                    read: tuple[str, ...] = (start_lr, end_lr)
                    if config["cycle_momentum"]:
                        read += (start_m, end_m)
                    _check_cycle_keys(group, index, read)
                    pct = (step_num - start_step) / (end_step - start_step)
                    lrs.append(anneal(group[start_lr], group[end_lr], pct))
                    if config["cycle_momentum"]:
                        momentum = anneal(group[start_m], group[end_m], pct)
                        set_momentum(group, momentum)
                    break
                start_step = end_step
        return lrs


def _check_cycle_keys(group: Mapping[str, Any], index: int, keys: tuple[str, ...]) -> None:
    """torch's OneCycleLR reads its bounds from each group, where its constructor wrote
    them: a group added later (add_param_group) has none, and torch raises KeyError."""
    missing = [key for key in dict.fromkeys(keys) if key not in group]
    if missing:
        raise InvalidInput(
            f"OneCycleLR cannot step param_groups[{index}]: torch's OneCycleLR reads "
            f"{', '.join(missing)} from every param group, which its constructor writes into "
            "the groups it was created with, and raises for a param group added after it "
            "(add_param_group)",
            "param_groups",
        )


def _total_steps(config: Mapping[str, Any]) -> int:
    if config["total_steps"] is not None:
        return int(config["total_steps"])
    return int(config["epochs"] * config["steps_per_epoch"])


def _phases(config: Mapping[str, Any]) -> list[Phase]:
    """torch's ``_schedule_phases``, with its exact end-step arithmetic."""
    total, pct_start = _total_steps(config), config["pct_start"]
    if config["three_phase"]:
        return [
            (float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            (
                float(2 * pct_start * total) - 2,
                "max_lr",
                "initial_lr",
                "base_momentum",
                "max_momentum",
            ),
            (total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
        ]
    return [
        (float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
        (total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
    ]


def _phase_span(config: Mapping[str, Any], step_num: int) -> tuple[float, float]:
    """The (start, end) step of the phase that ``get_lr`` picks for ``step_num``."""
    phases = _phases(config)
    start_step = 0.0
    for i, (end_step, *_) in enumerate(phases):
        if step_num <= end_step or i == len(phases) - 1:
            return start_step, end_step
        start_step = end_step
    raise AssertionError("unreachable: the last phase always matches")


def _annealing_cos(start: float, end: float, pct: float) -> float:
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def _annealing_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


register(OneCycleLR())
