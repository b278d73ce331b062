"""A session's configuration, validated once: tensors, groups, optimizer, schedule, clipping.

``plan_from_config`` turns the JSON config a client sends into a frozen :class:`Plan`, or
raises :class:`InvalidHyperparameter` naming the field by its dotted path
(``"optimizer.betas"``, ``"param_groups[1].lr"``, ``"schedule.schedulers[0].T_max"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import optimizers, schedules
from service.core.accumulation import AccumulateSpec, parse_accumulate
from service.core.averaging import AveragingSpec, parse_averaging
from service.core.errors import CoreError, InvalidHyperparameter
from service.core.hparams import Arg, check, resolve
from service.core.optimizers.base import Optimizer, Shape
from service.core.schedules.base import Schedule

TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
CONFIG_KEYS = (
    "optimizer",
    "schedule",
    "params",
    "param_groups",
    "dtype",
    "clip_grad_norm",
    "clip_grad_value",
    "nonfinite",
    "missing_grads",
    "accumulate",
    "averaging",
)
SCHEDULE_OPTIONS = (
    Arg(
        "interval",
        "str",
        "step",
        "advance after every step, or only on request",
        choices=(
            "step",
            "manual",
        ),
    ),
    Arg("every", "int", 1, "advance once per this many optimizer steps"),
)
CLIP_NORM_ARGS = (
    Arg("max_norm", "float", None, "max total norm of the gradients", required=True),
    Arg("norm_type", "float", 2.0, "p of the p-norm; inf for the max norm"),
)
CLIP_VALUE_ARGS = (Arg("clip_value", "float", None, "max absolute gradient", required=True),)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Shape

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Group:
    """One param group: which tensors (indices into ``Plan.tensors``), the optimizer that
    steps them and their hparams."""

    indices: tuple[int, ...]
    hparams: Mapping[str, Any]
    overrides: Mapping[str, Any]
    optimizer: Optimizer[Any]
    constructor: Mapping[str, Any]
    """The resolved arguments of the torch optimizer this group belongs to: the session's
    ``optimizer``, or the group's own ``"optimizer"`` entry."""
    own_optimizer: bool = False
    """The group names its own optimizer (``param_groups[i].optimizer``)."""

    def describe_optimizer(self) -> dict[str, Any]:
        return {"name": self.optimizer.name, **_jsonable(self.constructor)}


@dataclass(frozen=True)
class ScheduleSpec:
    schedule: Schedule
    config: Mapping[str, Any]
    interval: str
    every: int


@dataclass(frozen=True)
class Plan:
    tensors: tuple[TensorSpec, ...]
    dtype: np.dtype[Any]
    optimizer: Optimizer[Any]
    optimizer_config: Mapping[str, Any]
    groups: tuple[Group, ...]
    schedule: ScheduleSpec | None
    clip_grad_norm: Mapping[str, Any] | None
    clip_grad_value: Mapping[str, Any] | None
    nonfinite: str
    missing_grads: str = "error"
    """``"skip"``: a step may leave tensors out, as torch skips a parameter whose ``grad``
    is None (:mod:`service.core.partial`); ``"error"``: every tensor must be sent."""
    accumulate: AccumulateSpec | None = None
    """Gradient accumulation: one optimizer step per ``accumulate.steps`` posts."""
    averaging: AveragingSpec | None = None
    """An averaged copy of the held params (``AveragedModel``)."""

    @property
    def needs_params(self) -> bool:
        """Whether a step reads parameter values (weight decay, or LBFGS ask/tell)."""
        return self.ask_tell or any(g.optimizer.needs_params(g.hparams) for g in self.groups)

    @property
    def per_tensor_state(self) -> bool:
        """Whether every group keeps its state per tensor (all but LBFGS and the schedule-free
        optimizers, none of which shares a session with another optimizer)."""
        return all(g.optimizer.per_tensor_state for g in self.groups)

    @property
    def ask_tell(self) -> bool:
        """LBFGS with a line search or several iterations: it asks for points to evaluate."""
        probe = getattr(self.optimizer, "ask_tell", None)
        return bool(probe(self.groups[0].hparams)) if probe is not None else False

    @property
    def clipping_computes_grad_norm(self) -> bool:
        """Whether clipping computes the gradients' 2-norm before clipping (2-norm clipping
        alone), so that a step can report it without computing it again."""
        clip = self.clip_grad_norm
        return clip is not None and clip["norm_type"] == 2.0 and self.clip_grad_value is None

    @property
    def size(self) -> int:
        return sum(t.size for t in self.tensors)

    def elements(self, hparams: Sequence[Mapping[str, Any]] | None = None) -> int:
        """What the session's element limit counts: the parameters, plus the state that
        outgrows them (:meth:`Optimizer.extra_state_elements`) with each group's
        ``hparams`` (the plan's own by default; a running session's edited ones)."""
        hps = hparams if hparams is not None else [g.hparams for g in self.groups]
        extra = sum(
            g.optimizer.extra_state_elements([self.tensors[i].shape for i in g.indices], hp)
            for g, hp in zip(self.groups, hps, strict=True)
        )
        return self.size + extra

    def index(self, name: str) -> int | None:
        for i, t in enumerate(self.tensors):
            if t.name == name:
                return i
        return None

    def describe(self) -> dict[str, Any]:
        """The fully resolved config, in the same form ``plan_from_config`` accepts."""
        schedule: dict[str, Any] | None = None
        if self.schedule is not None:
            schedule = {
                "name": self.schedule.schedule.name,
                **_jsonable(self.schedule.config),
                "interval": self.schedule.interval,
                "every": self.schedule.every,
            }
        return {
            "optimizer": {"name": self.optimizer.name, **_jsonable(self.optimizer_config)},
            "schedule": schedule,
            "params": {t.name: {"shape": list(t.shape)} for t in self.tensors},
            "param_groups": [
                {
                    "params": [self.tensors[i].name for i in g.indices],
                    **({"optimizer": g.describe_optimizer()} if g.own_optimizer else {}),
                    **_jsonable(g.overrides),
                }
                for g in self.groups
                if g.overrides or g is not self.groups[0]
            ],
            "dtype": str(self.dtype),
            "clip_grad_norm": _jsonable(self.clip_grad_norm) if self.clip_grad_norm else None,
            "clip_grad_value": _jsonable(self.clip_grad_value) if self.clip_grad_value else None,
            "nonfinite": self.nonfinite,
            "missing_grads": self.missing_grads,
            "accumulate": self.accumulate.describe() if self.accumulate else None,
            "averaging": self.averaging.describe() if self.averaging else None,
        }

    def resolved_groups(self) -> list[dict[str, Any]]:
        """Each group's tensor names, optimizer and every hyperparameter, defaults filled in."""
        return [
            {
                "params": [self.tensors[i].name for i in g.indices],
                "optimizer": g.optimizer.name,
                **_jsonable(g.hparams),
            }
            for g in self.groups
        ]


def _jsonable(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in mapping.items()}


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidHyperparameter(field, f"{field} must be an object, got {value!r}", value)
    return value


def _name_of(config: Mapping[str, Any], field: str) -> str:
    name = config.get("name")
    if not isinstance(name, str):
        raise InvalidHyperparameter(f"{field}.name", f"{field}.name must be a string", name)
    return name


def _lookup(kind: str, config: Mapping[str, Any], field: str) -> Any:
    name = _name_of(config, field)
    try:
        return optimizers.get(name) if kind == "optimizer" else schedules.get(name)
    except CoreError as exc:
        raise InvalidHyperparameter(f"{field}.name", str(exc), name) from exc


def parse_tensors(raw: Any) -> tuple[TensorSpec, ...]:
    params = _mapping(raw, "params")
    check(len(params) > 0, "params", "params must name at least one tensor")
    specs = []
    for name, spec in params.items():
        field = f"params.{name}"
        check(
            isinstance(name, str) and TENSOR_NAME.fullmatch(name) is not None,
            field,
            f"tensor name {name!r} must match [A-Za-z0-9_.:-]+",
            name,
        )
        shape = _mapping(spec, field).get("shape")
        check(
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            f"{field}.shape",
            f"{field}.shape must be a list of non-negative integers, got {shape!r}",
            shape,
        )
        assert isinstance(shape, list)
        _check_array_shape(shape, f"{field}.shape")
        specs.append(TensorSpec(name, tuple(shape)))
    return tuple(specs)


MAX_DIMS = 64
"""numpy's limit on the dimensions of an array."""
MAX_ARRAY_ELEMENTS = 2**60
"""numpy refuses a shape whose nonzero dimensions' product times the item size (8 bytes
for float64) leaves a signed 64-bit integer, even when another dimension is 0."""


def _check_array_shape(shape: list[int], field: str) -> None:
    check(
        len(shape) <= MAX_DIMS,
        field,
        f"{field} has {len(shape)} dimensions; at most {MAX_DIMS} are supported",
        len(shape),
    )
    check(
        math.prod(d for d in shape if d) < MAX_ARRAY_ELEMENTS,
        field,
        f"{field} is too large for an array: its nonzero dimensions multiply to 2**60 or more",
        shape,
    )


def parse_optimizer(raw: Any, field: str) -> tuple[Optimizer[Any], dict[str, Any]]:
    """An ``{"name": ..., **hparams}`` entry: the optimizer and its constructor's arguments,
    defaults filled in and checked with torch's messages under ``field``."""
    given = dict(_mapping(raw, field))
    optimizer: Optimizer[Any] = _lookup("optimizer", given, field)
    given.pop("name")
    return optimizer, optimizer.resolve(given, where=f"{field}.")


def _group_optimizer(
    entry: dict[str, Any], field: str, default: tuple[Optimizer[Any], Mapping[str, Any]]
) -> tuple[Optimizer[Any], Mapping[str, Any], bool]:
    """The optimizer a group entry steps with: its own ``"optimizer"``, or the session's."""
    if "optimizer" not in entry:
        return default[0], default[1], False
    optimizer, constructor = parse_optimizer(entry.pop("optimizer"), f"{field}.optimizer")
    for either in (optimizer, default[0]):
        _check_shares(either, field)
    return optimizer, constructor, True


def _check_shares(optimizer: Optimizer[Any], field: str) -> None:
    """Refuse a session of two optimizers where one keeps its state over every tensor."""
    if optimizer.per_tensor_state:
        return
    # LBFGS keeps one state over all of its parameters and steps with a closure: torch
    # cannot step it beside another optimizer on a share of a model's tensors.
    message = "LBFGS doesn't support per-parameter options (parameter groups)"
    if optimizer.name != "LBFGS":
        # Schedule-free advances its step count and moves every tensor towards its average
        # on every step, gradient or not: a session's step reaches each of its tensors.
        message = (
            f"{optimizer.name} steps every tensor of a session on every step: it cannot "
            "share a session with another optimizer"
        )
    raise InvalidHyperparameter(f"{field}.optimizer.name", message, optimizer.name)


def _parse_groups(
    raw: Any, tensors: Sequence[TensorSpec], optimizer: Optimizer[Any], base: Mapping[str, Any]
) -> tuple[Group, ...]:
    listed: dict[str, int] = {}
    entries: list[tuple[list[str], dict[str, Any]]] = []
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise InvalidHyperparameter("param_groups", "param_groups must be a list", raw)
    for gi, entry in enumerate(raw):
        field = f"param_groups[{gi}]"
        entry = dict(_mapping(entry, field))
        names = entry.pop("params", None)
        check(
            isinstance(names, list) and len(names) > 0 and all(isinstance(n, str) for n in names),
            f"{field}.params",
            f"{field}.params must be a non-empty list of tensor names",
            names,
        )
        for name in names:
            check(
                any(t.name == name for t in tensors),
                f"{field}.params",
                f"{field} names unknown tensor {name!r}",
                name,
            )
            check(
                name not in listed,
                f"{field}.params",
                "some parameters appear in more than one parameter group",
                name,
            )
            listed[name] = gi
        entries.append((names, entry))
    if entries and getattr(optimizer, "name", "") == "LBFGS":
        raise InvalidHyperparameter(
            "param_groups", "LBFGS doesn't support per-parameter options (parameter groups)"
        )
    position = {t.name: i for i, t in enumerate(tensors)}
    groups: list[Group] = []
    default = tuple(i for i, t in enumerate(tensors) if t.name not in listed)
    if default:
        groups.append(Group(default, base, {}, optimizer, base))
        _check_shapes(groups[0], tensors, "params")
    for gi, (names, overrides) in enumerate(entries):
        field = f"param_groups[{gi}]"
        group_opt, constructor, own = _group_optimizer(overrides, field, (optimizer, base))
        # A group's overrides apply on top of its own optimizer's constructor arguments,
        # as torch fills a group's missing keys from that optimizer's defaults.
        hp = group_opt.resolve({**constructor, **overrides}, where=f"{field}.")
        known = {a.name for a in group_opt.args}
        clean = {k: hp[k] for k in overrides if k in known}
        indices = tuple(position[n] for n in names)
        groups.append(Group(indices, hp, clean, group_opt, constructor, own))
        _check_shapes(groups[-1], tensors, f"{field}.params")
    return tuple(groups)


def optimizer_instances(groups: Sequence[Group]) -> list[list[int]]:
    """The groups each torch optimizer of a session steps, by index: the session
    optimizer's groups together, each group that names its own optimizer alone. Rules that
    couple their groups (Prodigy) couple only those of one instance."""
    shared = [i for i, g in enumerate(groups) if not g.own_optimizer]
    own = [[i] for i, g in enumerate(groups) if g.own_optimizer]
    return ([shared] if shared else []) + own


def _check_shapes(group: Group, tensors: Sequence[TensorSpec], field: str) -> None:
    """A group's tensors fit its optimizer (Muon: 2-D only), or torch's error for ``field``."""
    try:
        group.optimizer.check_shapes([tensors[i].shape for i in group.indices], group.hparams)
    except CoreError as exc:
        raise InvalidHyperparameter(field, str(exc)) from exc


def parse_schedule(raw: Any, field: str = "schedule") -> ScheduleSpec | None:
    if raw is None:
        return None
    given = dict(_mapping(raw, field))
    schedule: Schedule = _lookup("schedule", given, field)
    given.pop("name")
    options = resolve(
        SCHEDULE_OPTIONS,
        {k: given.pop(k) for k in ("interval", "every") if k in given},
        where=f"{field}.",
    )
    check(options["every"] >= 1, f"{field}.every", "every must be >= 1", options["every"])
    config = schedule.resolve(given, where=f"{field}.")
    return ScheduleSpec(schedule, config, options["interval"], options["every"])


def _parse_clip(raw: Any, args: tuple[Arg, ...], field: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) and args is CLIP_VALUE_ARGS:
        raw = {"clip_value": raw}
    out = resolve(args, _mapping(raw, field), where=f"{field}.")
    for key in ("max_norm", "clip_value"):
        if key in out:
            check(out[key] >= 0, f"{field}.{key}", f"{key} must be >= 0, got {out[key]}", out[key])
    if "norm_type" in out:
        p = out["norm_type"]
        check(p > 0, f"{field}.norm_type", f"norm_type must be > 0 or inf, got {p}", p)
    return out


def plan_from_config(
    config: Mapping[str, Any],
    *,
    ignore: Collection[str] = (),
    schedule_groups: int | None = None,
) -> Plan:
    """Validate a whole session config; ``ignore`` lists keys owned by outer layers.

    ``schedule_groups`` is for a config extended by param groups added while the session
    ran (``add_param_group``): the schedule was created with only that many groups, and
    its per-group arguments are checked against them, not against the added ones.
    """
    config = _mapping(config, "config")
    for key in config:
        check(
            key in CONFIG_KEYS or key in ignore,
            key,
            f"unknown field {key!r}; expected one of {', '.join(CONFIG_KEYS)}",
        )
    tensors = parse_tensors(config.get("params"))
    dtype_name = config.get("dtype", "float32")
    check(
        dtype_name in DTYPES,
        "dtype",
        f"dtype must be float32 or float64, got {dtype_name!r}",
        dtype_name,
    )
    optimizer, base = parse_optimizer(config.get("optimizer"), "optimizer")
    groups = _parse_groups(config.get("param_groups"), tensors, optimizer, base)
    # The default group (tensors no entry lists) comes first and is the optimizer's own.
    entries = len(groups) - (1 if len(groups) > len(config.get("param_groups") or []) else 0)
    fields = ["optimizer."] * (len(groups) - entries) + [
        f"param_groups[{i}]." for i in range(entries)
    ]
    for members in optimizer_instances(groups):
        groups[members[0]].optimizer.check_groups(
            [groups[i].hparams for i in members], [fields[i] for i in members]
        )
    nonfinite = config.get("nonfinite", "error")
    check(
        nonfinite in ("error", "skip"),
        "nonfinite",
        f"nonfinite must be 'error' or 'skip', got {nonfinite!r}",
        nonfinite,
    )
    missing_grads = config.get("missing_grads", "error")
    check(
        missing_grads in ("error", "skip"),
        "missing_grads",
        f"missing_grads must be 'error' or 'skip', got {missing_grads!r}",
        missing_grads,
    )
    accumulate = parse_accumulate(config.get("accumulate"))
    averaging = parse_averaging(config.get("averaging"))
    schedule = parse_schedule(config.get("schedule"))
    if schedule is not None:
        # Per-group lists and momentum cycling depend on the optimizer's groups.
        hparams = [dict(g.hparams) for g in groups[:schedule_groups]]
        schedule.schedule.validate_groups(schedule.config, hparams, where="schedule.")
    plan = Plan(
        tensors=tensors,
        dtype=DTYPES[dtype_name],
        optimizer=optimizer,
        optimizer_config=base,
        groups=groups,
        schedule=schedule,
        clip_grad_norm=_parse_clip(config.get("clip_grad_norm"), CLIP_NORM_ARGS, "clip_grad_norm"),
        clip_grad_value=_parse_clip(
            config.get("clip_grad_value"), CLIP_VALUE_ARGS, "clip_grad_value"
        ),
        nonfinite=nonfinite,
        missing_grads=missing_grads,
        accumulate=accumulate,
        averaging=averaging,
    )
    check(
        accumulate is None or not plan.ask_tell,
        "accumulate",
        "accumulate cannot be combined with LBFGS ask/tell (a line search or max_iter > 1): "
        "its later evaluations are at points only the client's whole batch can score",
    )
    return plan
