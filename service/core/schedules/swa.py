"""SWALR: ``torch.optim.swa_utils.SWALR``, annealing each group's lr to its ``swa_lr``.

Like torch it writes ``swa_lr`` into the groups and anneals from the lr it finds there
(chainable: it reads ``group["lr"]`` at every step, so it composes in SequentialLR).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, register
from service.core.schedules.group_values import float_or_list, per_group
from service.core.schedules.lr_scheduler import LAST_EPOCH, LRSchedule, State

PER_GROUP = "a float, or a list with one float per param group"


class SWALR(LRSchedule):
    name = "SWALR"
    args = (
        Arg("swa_lr", "any", None, f"the lr annealed to: {PER_GROUP}", required=True),
        Arg("anneal_epochs", "int", 10, "steps of the annealing"),
        Arg("anneal_strategy", "str", "cos", "cos or linear"),
        LAST_EPOCH,
    )
    has_closed_form = False

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        config = super().resolve(given, where)
        config["swa_lr"] = float_or_list(config, "swa_lr", where)
        return config

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        strategy = config["anneal_strategy"]
        check(
            strategy in ("cos", "linear"),
            f"{where}anneal_strategy",
            f"anneal_strategy must by one of 'cos' or 'linear', instead got {strategy}",
            strategy,
        )
        epochs = config["anneal_epochs"]
        check(
            epochs >= 0,
            f"{where}anneal_epochs",
            f"anneal_epochs must be equal or greater than 0, got {epochs}",
            epochs,
        )

    def construct(self, config: Mapping[str, Any], groups: Groups, where: str) -> State:
        for swa_lr, group in zip(
            per_group("swa_lr", config["swa_lr"], groups, where), groups, strict=True
        ):
            group["swa_lr"] = swa_lr
        return {}

    @staticmethod
    def _anneal(strategy: str, t: float) -> float:
        return t if strategy == "linear" else (1 - math.cos(math.pi * t)) / 2

    def get_lr(
        self, config: Mapping[str, Any], state: State, groups: Groups, initial: bool
    ) -> list[float]:
        strategy, epochs = config["anneal_strategy"], config["anneal_epochs"]
        step = state["step_count"] - 1
        if epochs == 0:
            step = max(1, step)
        prev_alpha = self._anneal(strategy, max(0, min(1, (step - 1) / max(1, epochs))))
        prev_lrs = [
            group["swa_lr"]
            if prev_alpha == 1
            else (group["lr"] - prev_alpha * group["swa_lr"]) / (1 - prev_alpha)
            for group in groups
        ]
        alpha = self._anneal(strategy, max(0, min(1, step / max(1, epochs))))
        return [
            group["swa_lr"] * alpha + lr * (1 - alpha)
            for group, lr in zip(groups, prev_lrs, strict=True)
        ]


register(SWALR())
