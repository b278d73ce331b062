"""ReduceLROnPlateau: divide the lr when a monitored metric stops improving."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.hparams import Arg, check
from service.core.schedules.base import Groups, Schedule, register
from service.core.schedules.group_values import (
    decode_float,
    encode_float,
    float_or_list,
    lrs_of,
)


class ReduceLROnPlateau(Schedule):
    """torch's ReduceLROnPlateau; ``step`` needs the metric.

    Unlike the other schedules torch's constructor takes no initial step and records no
    ``initial_lr``. Its best value starts at +-infinity, kept in the JSON state as
    ``"inf"`` / ``"-inf"`` so the state stays strict JSON.
    """

    name = "ReduceLROnPlateau"
    needs_metric = True
    args = (
        Arg("mode", "str", "min", "min: reduce when the metric stops decreasing; max: increasing"),
        Arg("factor", "float", 0.1, "new_lr = lr * factor"),
        Arg("patience", "int", 10, "epochs without improvement tolerated before reducing"),
        Arg("threshold", "float", 1e-4, "threshold for measuring a new optimum"),
        Arg("threshold_mode", "str", "rel", "rel or abs"),
        Arg("cooldown", "int", 0, "epochs to wait after a reduction before counting again"),
        Arg("min_lr", "any", 0.0, "lower bound on the lr: a float, or one per param group"),
        Arg("eps", "float", 1e-8, "reductions smaller than this are skipped"),
    )

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        config = super().resolve(given, where)
        config["min_lr"] = float_or_list(config, "min_lr", where)
        return config

    def validate(self, config: Mapping[str, Any], where: str = "") -> None:
        factor, mode, threshold_mode = config["factor"], config["mode"], config["threshold_mode"]
        check(factor < 1.0, f"{where}factor", "Factor should be < 1.0.", factor)
        check(mode in ("min", "max"), f"{where}mode", f"mode {mode} is unknown!", mode)
        check(
            threshold_mode in ("rel", "abs"),
            f"{where}threshold_mode",
            f"threshold mode {threshold_mode} is unknown!",
            threshold_mode,
        )

    def validate_groups(self, config: Mapping[str, Any], groups: Groups, where: str = "") -> None:
        self._min_lrs(config, groups, where)

    @staticmethod
    def _min_lrs(config: Mapping[str, Any], groups: Groups, where: str) -> list[float]:
        min_lr = config["min_lr"]
        if not isinstance(min_lr, list):
            return [min_lr] * len(groups)
        if len(min_lr) != len(groups):
            raise InvalidHyperparameter(
                f"{where}min_lr", f"expected {len(groups)} min_lrs, got {len(min_lr)}", min_lr
            )
        return list(min_lr)

    def start(self, config: Mapping[str, Any], groups: Groups) -> dict[str, Any]:
        worse = float("inf") if config["mode"] == "min" else float("-inf")
        return {
            "last_epoch": 0,
            "last_lr": lrs_of(groups),
            "min_lrs": self._min_lrs(config, groups, ""),
            "best": encode_float(worse),
            "cooldown_counter": 0,
            "num_bad_epochs": 0,
        }

    def step(
        self,
        config: Mapping[str, Any],
        state: dict[str, Any],
        groups: Groups,
        metric: float | None = None,
    ) -> dict[str, Any]:
        if metric is None:
            raise InvalidInput("ReduceLROnPlateau needs a metric to step", "metric")
        current = float(metric)
        state["last_epoch"] += 1

        if self._is_better(config, current, decode_float(state["best"])):
            state["best"] = encode_float(current)
            state["num_bad_epochs"] = 0
        else:
            state["num_bad_epochs"] += 1

        if state["cooldown_counter"] > 0:
            state["cooldown_counter"] -= 1
            state["num_bad_epochs"] = 0  # bad epochs in cooldown do not count

        if state["num_bad_epochs"] > config["patience"]:
            self._reduce_lr(config, state, groups)
            state["cooldown_counter"] = config["cooldown"]
            state["num_bad_epochs"] = 0

        state["last_lr"] = lrs_of(groups)
        return state

    @staticmethod
    def _reduce_lr(config: Mapping[str, Any], state: dict[str, Any], groups: Groups) -> None:
        for group, min_lr in zip(groups, state["min_lrs"], strict=True):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * config["factor"], min_lr)
            if old_lr - new_lr > config["eps"]:
                group["lr"] = new_lr

    @staticmethod
    def _is_better(config: Mapping[str, Any], a: float, best: float) -> bool:
        threshold: float = config["threshold"]
        if config["mode"] == "min" and config["threshold_mode"] == "rel":
            return a < best * (1.0 - threshold)
        if config["mode"] == "min":
            return a < best - threshold
        if config["threshold_mode"] == "rel":
            return a > best * (threshold + 1.0)
        return a > best + threshold


register(ReduceLROnPlateau())
