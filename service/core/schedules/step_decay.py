"""Step decays: StepLR (every ``step_size`` epochs) and MultiStepLR (at milestones)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Any

from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import lrs_of
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State


class StepLR(LRSchedule):
    """``lr *= gamma`` whenever ``last_epoch`` is a non-zero multiple of ``step_size``."""

    name = "StepLR"
    args = (
        Arg("step_size", "int", None, "period of learning rate decay", required=True),
        Arg("gamma", "float", 0.1, "multiplicative factor of learning rate decay"),
        LAST_EPOCH,
    )

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        # torch does not check, then divides by step_size on the first step.
        step_size = config["step_size"]
        check(
            step_size > 0,
            f"{where}step_size",
            f"Expected positive integer step_size, but got {step_size}",
            step_size,
        )

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        epoch = state["last_epoch"]
        if epoch == 0 or epoch % config["step_size"] != 0:
            return lrs_of(groups)
        return [group["lr"] * config["gamma"] for group in groups]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        exponent = state["last_epoch"] // config["step_size"]
        return [base_lr * config["gamma"] ** exponent for base_lr in state["base_lrs"]]


class MultiStepLR(LRSchedule):
    """``lr *= gamma ** n`` when ``last_epoch`` appears ``n`` times in ``milestones``."""

    name = "MultiStepLR"
    args = (
        Arg("milestones", "int_list", None, "epoch indices of the decays", required=True),
        Arg("gamma", "float", 0.1, "multiplicative factor of learning rate decay"),
        LAST_EPOCH,
    )

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        # torch keeps a Counter of the milestones; the list's count is the same number.
        hits = config["milestones"].count(state["last_epoch"])
        if hits == 0:
            return lrs_of(groups)
        return [group["lr"] * config["gamma"] ** hits for group in groups]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        passed = bisect_right(sorted(config["milestones"]), state["last_epoch"])
        return [base_lr * config["gamma"] ** passed for base_lr in state["base_lrs"]]


register(StepLR())
register(MultiStepLR())
