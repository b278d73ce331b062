"""Per-group values as torch's schedulers read and write them.

Helpers shared by the schedules: torch's ``_format_param`` (one value or one per group),
the "float or list" arguments that feed it, setting momentum or beta1 the way the
cyclic schedules do, and a JSON-safe encoding for the infinities ReduceLROnPlateau keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.hparams import as_float

Groups = list[dict[str, Any]]


def float_or_list(config: Mapping[str, Any], name: str, where: str) -> float | list[float]:
    """Canonical form of an argument that torch takes as a float or a list of floats."""
    value = config[name]
    field = f"{where}{name}"
    if isinstance(value, bool):
        raise InvalidHyperparameter(field, f"{field} must be a number or a list of numbers", value)
    if isinstance(value, int | float):
        return _finite_or_inf(as_float(value, field), field, value)
    if isinstance(value, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        return [_finite_or_inf(as_float(v, field), field, value) for v in value]
    raise InvalidHyperparameter(field, f"{field} must be a number or a list of numbers", value)


def _finite_or_inf(number: float, field: str, value: Any) -> float:
    if math.isnan(number):
        raise InvalidHyperparameter(field, f"{field} must not be NaN", value)
    return number


def per_group(
    name: str, value: float | list[float], groups: Groups, where: str = ""
) -> list[float]:
    """torch's ``_format_param``: a list must have one entry per group, a scalar is repeated."""
    if isinstance(value, list):
        if len(value) != len(groups):
            raise InvalidHyperparameter(
                f"{where}{name}",
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(value)} values, param_groups has {len(groups)}.",
                value,
            )
        return list(value)
    return [value] * len(groups)


def check_momentum(groups: Groups, where: str) -> None:
    """torch's refusal of ``cycle_momentum`` for an optimizer without momentum or betas.

    torch looks at each optimizer's ``defaults``; a group here holds every resolved
    hyperparameter of its optimizer, so its keys are the same names. Groups stepped by
    different optimizers (Muon's momentum, AdamW's betas) are each checked, as torch checks
    each optimizer's own scheduler.
    """
    for group in groups or [{}]:
        if "momentum" not in group and "betas" not in group:
            raise InvalidHyperparameter(
                f"{where}cycle_momentum",
                "optimizer must support momentum or beta1 with `cycle_momentum` option enabled",
                True,
            )


def set_momentum(group: dict[str, Any], value: float) -> None:
    """Write momentum, or beta1 keeping beta2, as the cyclic schedules do: beta1 when the
    group's optimizer has ``betas`` (torch's ``use_beta1``)."""
    if "betas" in group:
        betas = group["betas"]
        new = (value, *betas[1:])
        group["betas"] = new if isinstance(betas, tuple) else list(new)
    else:
        group["momentum"] = value


def start_momentum_cycle(
    groups: Groups, max_momentums: list[float], base_momentums: list[float]
) -> None:
    """What CyclicLR's and OneCycleLR's constructors do to fresh groups: start each at its
    max momentum (or beta1) and record both bounds in the group, where torch keeps them."""
    for m_momentum, b_momentum, group in zip(max_momentums, base_momentums, groups, strict=True):
        set_momentum(group, m_momentum)
        group["max_momentum"] = m_momentum
        group["base_momentum"] = b_momentum


def added_group_error(schedule: str, values: int, groups: int, what: str = "lrs") -> InvalidInput:
    """The refusal for a step torch's scheduler cannot take: it computed one value per
    param group it was created with, and ``zip(..., strict=True)`` raises on the longer
    ``param_groups`` a later ``add_param_group`` left."""
    return InvalidInput(
        f"{schedule} cannot step {groups} param groups: at this step torch's {schedule} "
        f"computes {what} for only the {values} param groups it was created with, and raises "
        "for a param group added after it (add_param_group)",
        "param_groups",
    )


def check_count(schedule: str, values: list[Any], groups: Groups, what: str = "lrs") -> None:
    """torch's ``zip(param_groups, values, strict=True)``: one value per group, or refuse."""
    if len(values) != len(groups):
        raise added_group_error(schedule, len(values), len(groups), what)


def lrs_of(groups: Groups) -> list[float]:
    """torch's ``_param_groups_val_list(optimizer, "lr")``."""
    return [group["lr"] for group in groups]


def clone(value: Any) -> Any:
    """A copy of JSON-like data (dicts, lists, tuples, scalars): ``copy.deepcopy`` without
    its bookkeeping, which would cost more than the schedule step it protects."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone(v) for v in value)
    return value


def encode_float(value: float) -> float | str:
    """A float as strict JSON: non-finite values become ``"inf"``, ``"-inf"``, ``"nan"``."""
    return value if math.isfinite(value) else str(value)


def decode_float(value: float | str) -> float:
    return float(value)
