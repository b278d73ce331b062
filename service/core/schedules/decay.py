"""Smooth decays: ExponentialLR (``gamma`` per epoch) and PolynomialLR (to 0 at total_iters)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core.errors import InvalidHyperparameter
from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import lrs_of
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State
from service.core.schedules.warmup import _zero_total_iters


class ExponentialLR(LRSchedule):
    """``lr *= gamma`` every epoch."""

    name = "ExponentialLR"
    args = (
        Arg("gamma", "float", None, "multiplicative factor of learning rate decay", required=True),
        LAST_EPOCH,
    )

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        # The initial step of a resumed schedule must not decay once more.
        if initial:
            return lrs_of(groups)
        return [group["lr"] * config["gamma"] for group in groups]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        return [base_lr * config["gamma"] ** state["last_epoch"] for base_lr in state["base_lrs"]]


class PolynomialLR(LRSchedule):
    """``base_lr * (1 - last_epoch / total_iters) ** power``, by torch's ratio recurrence."""

    name = "PolynomialLR"
    args = (
        Arg("total_iters", "int", 5, "number of steps of the decay"),
        Arg("power", "float", 1.0, "power of the polynomial"),
        LAST_EPOCH,
    )

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        # torch accepts it, then raises 0.0 to a negative power at total_iters.
        power = config["power"]
        check(power >= 0, f"{where}power", f"power must be non-negative, got {power}", power)

    def milestone_problem(
        self, config: Mapping[str, Any], where: str
    ) -> InvalidHyperparameter | None:
        return _zero_total_iters(config, where)

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        epoch, total = state["last_epoch"], config["total_iters"]
        if initial or epoch > total:
            return lrs_of(groups)
        decay = ((1.0 - epoch / total) / (1.0 - (epoch - 1) / total)) ** config["power"]
        return [group["lr"] * decay for group in groups]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        total = config["total_iters"]
        remaining = 1.0 - min(total, state["last_epoch"]) / total
        return [base_lr * remaining ** config["power"] for base_lr in state["base_lrs"]]


register(ExponentialLR())
register(PolynomialLR())
