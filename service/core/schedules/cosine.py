"""Cosine annealing: CosineAnnealingLR (torch's recurrence) and CosineAnnealingWarmRestarts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import check_count, lrs_of
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State


class CosineAnnealingLR(LRSchedule):
    r"""Cosine annealing from the base lr to ``eta_min`` over ``T_max`` epochs, and back.

    torch steps it by the recurrence
    :math:`\eta_{t} = \eta_{min} + (\eta_{t-1} - \eta_{min})
    \frac{1 + \cos(\pi t / T_{max})}{1 + \cos(\pi (t-1) / T_{max})}`,
    with an additive step where the denominator would vanish; its numbers differ from
    the closed form in the last bits, and those bits are what parity means.
    """

    name = "CosineAnnealingLR"
    args = (
        Arg("T_max", "int", None, "maximum number of iterations (half a period)", required=True),
        Arg("eta_min", "float", 0.0, "minimum learning rate"),
        LAST_EPOCH,
    )

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        # torch does not check, then divides by T_max on the first step.
        t_max = config["T_max"]
        check(
            t_max > 0, f"{where}T_max", f"Expected positive integer T_max, but got {t_max}", t_max
        )

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        epoch, t_max, eta_min = state["last_epoch"], config["T_max"], config["eta_min"]
        if initial:
            return lrs_of(groups)
        if state["step_count"] == 1 and epoch > 0:
            check_count(self.name, state["base_lrs"], groups, "its lrs from base_lrs")
            return [
                eta_min + (base_lr - eta_min) * (1 + math.cos((epoch) * math.pi / t_max)) / 2
                for base_lr in state["base_lrs"]
            ]
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            # torch zips base_lrs with the groups, strictly, on the step after each trough.
            check_count(self.name, state["base_lrs"], groups, "its lrs from base_lrs")
            return [
                group["lr"] + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
                for base_lr, group in zip(state["base_lrs"], groups, strict=True)
            ]
        return [
            (1 + math.cos(math.pi * epoch / t_max))
            / (1 + math.cos(math.pi * (epoch - 1) / t_max))
            * (group["lr"] - eta_min)
            + eta_min
            for group in groups
        ]

    def closed_form(self, config: Mapping[str, Any], state: State) -> list[float]:
        epoch, t_max, eta_min = state["last_epoch"], config["T_max"], config["eta_min"]
        return [
            eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2
            for base_lr in state["base_lrs"]
        ]


class CosineAnnealingWarmRestarts(LRSchedule):
    """SGDR: cosine from the base lr to ``eta_min`` over ``T_i`` epochs, then restart,
    with ``T_i`` multiplied by ``T_mult`` at every restart."""

    name = "CosineAnnealingWarmRestarts"
    args = (
        Arg("T_0", "int", None, "number of iterations until the first restart", required=True),
        Arg("T_mult", "int", 1, "factor by which T_i grows after a restart"),
        Arg("eta_min", "float", 0.0, "minimum learning rate"),
        LAST_EPOCH,
    )
    has_closed_form = False

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        t_0, t_mult = config["T_0"], config["T_mult"]
        check(t_0 > 0, f"{where}T_0", f"Expected positive integer T_0, but got {t_0}", t_0)
        check(
            t_mult >= 1, f"{where}T_mult", f"Expected integer T_mult >= 1, but got {t_mult}", t_mult
        )

    def construct(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        return {"T_i": config["T_0"], "T_cur": config["last_epoch"]}

    def advance(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> None:
        # torch overrides step(): no step count, and T_cur / T_i carry the position.
        if state["last_epoch"] < 0:
            # torch's step(epoch=0): the explicit-epoch branch, with epoch < T_0.
            state["T_i"] = config["T_0"]
            state["T_cur"] = 0
            state["last_epoch"] = 0
        else:
            state["last_epoch"] += 1
            state["T_cur"] += 1
            if state["T_cur"] >= state["T_i"]:
                state["T_cur"] = state["T_cur"] % state["T_i"]
                state["T_i"] = state["T_i"] * config["T_mult"]
        self.apply(state, groups, self.get_lr(config, state, groups, initial))

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        eta_min, t_cur, t_i = config["eta_min"], state["T_cur"], state["T_i"]
        return [
            eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
            for base_lr in state["base_lrs"]
        ]


register(CosineAnnealingLR())
register(CosineAnnealingWarmRestarts())
