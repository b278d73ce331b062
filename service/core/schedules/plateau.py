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
        # Worked out on locals and committed at the end: a reduction torch cannot make
        # (param groups added since, with one min_lr per group) leaves the state as it was.
        best = decode_float(state["best"])
        num_bad_epochs = state["num_bad_epochs"]
        cooldown_counter = state["cooldown_counter"]
        if self._is_better(config, current, best):
            best = current
            num_bad_epochs = 0
        else:
            num_bad_epochs += 1

        if cooldown_counter > 0:
            cooldown_counter -= 1
            num_bad_epochs = 0  # bad epochs in cooldown do not count

        min_lrs = None
        if num_bad_epochs > config["patience"]:
            min_lrs = self._min_lrs_now(config, state, groups)
            cooldown_counter = config["cooldown"]
            num_bad_epochs = 0

        if min_lrs is not None:
            self._reduce_lr(config, min_lrs, groups)
            state["min_lrs"] = min_lrs
        state["last_epoch"] += 1
        state["best"] = encode_float(best)
        state["num_bad_epochs"] = num_bad_epochs
        state["cooldown_counter"] = cooldown_counter
        state["last_lr"] = lrs_of(groups)
        return state

    def check_groups(
        self, config: Mapping[str, Any], state: dict[str, Any], groups: Groups
    ) -> None:
        """Refuse an added param group when ``min_lr`` is a list: torch raises at its next
        reduction, which a plateau brings sooner or later, and asks for ``min_lrs`` to be
        extended by hand, which a session cannot do. With one ``min_lr`` for all groups torch
        extends the list, and so does this schedule."""
        self._min_lrs_now(config, state, groups)

    @staticmethod
    def _min_lrs_now(
        config: Mapping[str, Any], state: dict[str, Any], groups: Groups
    ) -> list[float]:
        """torch's ``_reduce_lr`` preamble: one min_lr per group as the groups are now."""
        min_lrs: list[float] = list(state["min_lrs"])
        if len(min_lrs) == len(groups):
            return min_lrs
        if isinstance(config["min_lr"], list):
            raise InvalidInput(
                f"ReduceLROnPlateau cannot reduce {len(groups)} param groups: it was created "
                f"with {len(min_lrs)} per-group min_lr values, and torch's ReduceLROnPlateau "
                "raises at its next reduction when a param group was added after it "
                "(add_param_group); give min_lr as one number to let it cover added groups",
                "param_groups",
            )
        return [config["min_lr"]] * len(groups)

    @staticmethod
    def _reduce_lr(config: Mapping[str, Any], min_lrs: list[float], groups: Groups) -> None:
        for group, min_lr in zip(groups, min_lrs, strict=True):
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
