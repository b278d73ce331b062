"""CyclicLR: the lr cycles between ``base_lr`` and ``max_lr``, momentum (or beta1) inversely."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import (
    check_count,
    check_momentum,
    float_or_list,
    per_group,
    set_momentum,
    start_momentum_cycle,
)
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State

MODES = ("triangular", "triangular2", "exp_range")
PER_GROUP = "a float, or a list with one float per param group"


class CyclicLR(LRSchedule):
    """Cyclical learning rates (Smith, 2017) with torch's three built-in policies.

    ``scale_fn`` (a Python callable) is not offered; without it torch derives the scale
    mode from ``mode`` (``"cycle"`` for the triangular policies, ``"iterations"`` for
    ``exp_range``) and ignores ``scale_mode``, and so does this schedule.
    """

    name = "CyclicLR"
    args = (
        Arg("base_lr", "any", None, f"lower lr boundary: {PER_GROUP}", required=True),
        Arg("max_lr", "any", None, f"upper lr boundary: {PER_GROUP}", required=True),
        Arg("step_size_up", "int", 2000, "iterations in the increasing half of a cycle"),
        Arg(
            "step_size_down",
            "int",
            None,
            "iterations in the decreasing half; null means step_size_up",
            nullable=True,
        ),
        Arg("mode", "str", "triangular", f"one of {', '.join(MODES)}"),
        Arg("gamma", "float", 1.0, "constant of the exp_range policy: gamma ** iterations"),
        Arg(
            "scale_mode",
            "str",
            "cycle",
            "cycle or iterations; torch ignores it unless scale_fn is given",
            choices=("cycle", "iterations"),
        ),
        Arg("cycle_momentum", "bool", True, "cycle momentum (or beta1) inversely to the lr"),
        Arg("base_momentum", "any", 0.8, f"lower momentum boundary: {PER_GROUP}"),
        Arg("max_momentum", "any", 0.9, f"upper momentum boundary: {PER_GROUP}"),
        LAST_EPOCH,
    )
    has_closed_form = False

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        config = super().resolve(given, where)
        for name in ("base_lr", "max_lr", "base_momentum", "max_momentum"):
            config[name] = float_or_list(config, name, where)
        return config

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        up, down = config["step_size_up"], config["step_size_down"]
        # torch does not check these, then divides by zero at the first step.
        check(
            up > 0,
            f"{where}step_size_up",
            f"Expected positive integer step_size_up, but got {up}",
            up,
        )
        check(
            down is None or down >= 0,
            f"{where}step_size_down",
            f"Expected non-negative integer step_size_down, but got {down}",
            down,
        )
        check(
            config["mode"] in MODES,
            f"{where}mode",
            "mode is invalid and scale_fn is None",
            config["mode"],
        )

    def construct(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        last_epoch = config["last_epoch"]
        base_lrs = per_group("base_lr", config["base_lr"], groups, where)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, groups, strict=True):
                group["lr"] = lr
        state: State = {
            "cyclic_base_lrs": base_lrs,
            "max_lrs": per_group("max_lr", config["max_lr"], groups, where),
        }
        if config["cycle_momentum"]:
            check_momentum(groups, where)
            base_momentums = per_group("base_momentum", config["base_momentum"], groups, where)
            max_momentums = per_group("max_momentum", config["max_momentum"], groups, where)
            if last_epoch == -1:
                start_momentum_cycle(groups, max_momentums, base_momentums)
            state.update(base_momentums=base_momentums, max_momentums=max_momentums)
        return state

    def begin(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        state = super().begin(config, groups, where)
        # torch takes its initial step with base_lrs from initial_lr, and only then
        # replaces them with base_lr.
        state["base_lrs"] = state.pop("cyclic_base_lrs")
        return state

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        epoch = state["last_epoch"]
        up = float(config["step_size_up"])
        down = float(config["step_size_down"]) if config["step_size_down"] is not None else up
        total_size = up + down
        step_ratio = up / total_size

        cycle = math.floor(1 + epoch / total_size)
        x = 1.0 + epoch / total_size - cycle
        scale_factor = x / step_ratio if x <= step_ratio else (x - 1) / (step_ratio - 1)
        scale = self._scale(config, cycle, epoch)

        lrs = []
        for base_lr, max_lr in zip(state["base_lrs"], state["max_lrs"], strict=True):
            base_height = (max_lr - base_lr) * scale_factor
            lrs.append(base_lr + base_height * scale)

        if config["cycle_momentum"]:
            check_count(self.name, state["max_momentums"], groups, "momentums")
            for base_momentum, max_momentum, group in zip(
                state["base_momentums"], state["max_momentums"], groups, strict=True
            ):
                base_height = (max_momentum - base_momentum) * scale_factor
                set_momentum(group, max_momentum - base_height * scale)
        return lrs

    @staticmethod
    def _scale(config: Mapping[str, Any], cycle: int, epoch: int) -> float:
        """torch's scale_fn, evaluated on the cycle or on the iteration as the mode says."""
        mode = config["mode"]
        if mode == "triangular":
            return 1.0
        if mode == "triangular2":
            return 1 / (2.0 ** (cycle - 1))
        gamma: float = config["gamma"]
        return gamma**epoch


register(CyclicLR())
