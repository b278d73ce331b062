"""Warmup factors: ConstantLR and LinearLR scale the lr until ``total_iters``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core.errors import InvalidHyperparameter
from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import lrs_of
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State


class ConstantLR(LRSchedule):
    """``lr * factor`` until ``total_iters``, then the factor is divided back out."""

    name = "ConstantLR"
    args = (
        Arg("factor", "float", 1.0 / 3, "factor applied until total_iters"),
        Arg("total_iters", "int", 5, "number of steps the factor applies for"),
        LAST_EPOCH,
    )

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        factor, total_iters = config["factor"], config["total_iters"]
        check(
            0 <= factor <= 1.0,
            f"{where}factor",
            "Constant multiplicative factor expected to be between 0 and 1.",
            factor,
        )
        # torch accepts it, then divides by the factor when total_iters is reached.
        check(
            factor != 0 or total_iters <= 0,
            f"{where}factor",
            "factor 0 cannot be undone at total_iters (torch divides by it there)",
            factor,
        )

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        epoch, factor = state["last_epoch"], config["factor"]
        if epoch == 0:
            return [group["lr"] * factor for group in groups]
        if epoch != config["total_iters"]:
            return lrs_of(groups)
        return [group["lr"] * (1.0 / factor) for group in groups]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        factor = config["factor"]
        reached = state["last_epoch"] >= config["total_iters"]
        return [base_lr * (factor + reached * (1 - factor)) for base_lr in state["base_lrs"]]


class LinearLR(LRSchedule):
    """The factor moves linearly from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    name = "LinearLR"
    args = (
        Arg("start_factor", "float", 1.0 / 3, "factor at the first epoch"),
        Arg("end_factor", "float", 1.0, "factor at total_iters and after"),
        Arg("total_iters", "int", 5, "number of steps of the linear change"),
        LAST_EPOCH,
    )

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        start, end = config["start_factor"], config["end_factor"]
        check(
            0 < start <= 1.0,
            f"{where}start_factor",
            "Starting multiplicative factor expected to be greater than 0 and less or equal to 1.",
            start,
        )
        check(
            0 <= end <= 1.0,
            f"{where}end_factor",
            "Ending multiplicative factor expected to be between 0 and 1.",
            end,
        )

    def milestone_problem(
        self, config: Mapping[str, Any], where: str
    ) -> InvalidHyperparameter | None:
        return _zero_total_iters(config, where)

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        epoch = state["last_epoch"]
        start, end, total = config["start_factor"], config["end_factor"], config["total_iters"]
        if epoch == 0:
            return [group["lr"] * start for group in groups]
        if initial or epoch > total:
            return lrs_of(groups)
        return [
            group["lr"] * (1.0 + (end - start) / (total * start + (epoch - 1) * (end - start)))
            for group in groups
        ]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        start, end, total = config["start_factor"], config["end_factor"], config["total_iters"]
        done = min(total, state["last_epoch"])
        return [base_lr * (start + (end - start) * done / total) for base_lr in state["base_lrs"]]


def _zero_total_iters(config: Mapping[str, Any], where: str) -> InvalidHyperparameter | None:
    """The closed form SequentialLR uses at a milestone divides by ``total_iters``."""
    if config["total_iters"] != 0:
        return None
    return InvalidHyperparameter(
        f"{where}total_iters",
        "total_iters must not be 0 in a schedule that SequentialLR switches to at a "
        "milestone (torch divides by it there)",
        0,
    )


register(ConstantLR())
register(LinearLR())
