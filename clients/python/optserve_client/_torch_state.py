"""Moving optimizer and scheduler state between torch and an optserve checkpoint.

A checkpoint (``GET .../state``) holds, per param group ``i``, the optimizer's state
record as arrays ``state/group<i>/<field>.<k>`` (one per tensor that has the field) and
JSON scalars, the groups' current hyperparameters, and the schedule's state. The server
names record fields and schedule state keys as torch does (``exp_avg``, ``step``,
``momentum_buffer``; ``last_epoch``, ``base_lrs``, ``_step_count`` as ``step_count``), so
the conversion is by name. It starts from a template checkpoint of a fresh session with
the same config, which fixes the layout the server expects.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

LAYOUT = "__layout__"
_COMPOSITES = ("SequentialLR", "ChainedScheduler")
_NOT_CONFIG = ("last_epoch", "verbose")
"""Schedule arguments that describe a run's start, not its shape."""
_ONLY_FOR = {
    "row_var": lambda p: p.dim() >= 2,
    "col_var": lambda p: p.dim() >= 2,
    "variance": lambda p: p.dim() < 2,
}
"""Adafactor keeps factored state for matrices and a full one for vectors."""


class ConversionError(ValueError):
    """The state cannot be carried over exactly (and nothing was changed)."""


def check_convertible(name: str) -> None:
    if name.lower() == "lbfgs":
        raise ConversionError(
            "LBFGS state (its history and a step suspended mid line search) is not carried "
            "between torch and optserve; start the remote LBFGS fresh"
        )


# Config: torch objects -> the session config of the HTTP API


def optimizer_config(
    optimizer: torch.optim.Optimizer, known_args: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]] | None, list[list[str]]]:
    """The session's ``optimizer`` and ``param_groups`` for a torch optimizer, and names.

    A group's ``lr`` is its ``initial_lr`` when a scheduler set one: the schedule starts
    from there; the current lr comes with the state.
    """
    defaults = optimizer.defaults
    base = {"name": type(optimizer).__name__}
    base.update({k: _plain(defaults[k]) for k in known_args if k in defaults})
    names: list[list[str]] = []
    groups: list[dict[str, Any]] = []
    counter = 0
    for group in optimizer.param_groups:
        given = group.get("param_names")
        members = [str(n) for n in given] if given else []
        if not members:
            members = [f"param{counter + i}" for i in range(len(group["params"]))]
        counter += len(members)
        names.append(members)
        values = {k: _plain(group[k]) for k in known_args if k in group}
        if "initial_lr" in group:
            values["lr"] = _plain(group["initial_lr"])
        groups.append({"params": members, **values})
    if len(groups) == 1:
        return {**base, **{k: v for k, v in groups[0].items() if k != "params"}}, None, names
    # Every tensor listed: the server's default group is empty and so left out, and its
    # groups are torch's, in torch's order.
    return base, groups, names


def schedule_config(
    scheduler: Any, catalog: Mapping[str, Sequence[str]], options: Mapping[str, Any]
) -> dict[str, Any]:
    """A torch scheduler's constructor arguments, read back from the object."""
    name = type(scheduler).__name__
    if name not in catalog:
        raise ConversionError(f"optserve has no schedule {name}")
    state = scheduler.state_dict()
    config: dict[str, Any] = {"name": name}
    for arg in catalog[name]:
        if arg in _NOT_CONFIG:
            continue
        if arg == "schedulers":
            children = scheduler._schedulers
            config[arg] = [schedule_config(c, catalog, {}) for c in children]
            continue
        found = False
        for source in (state, vars(scheduler)):
            for key in (arg, "_" + arg):
                if key in source:
                    config[arg] = _plain(source[key])
                    found = True
                    break
            if found:
                break
        if not found:
            raise ConversionError(
                f"cannot read {name}'s argument {arg!r} back from the scheduler; pass "
                "schedule={...} with its constructor arguments"
            )
    config.update(options)
    return config


# State: torch -> checkpoint


def checkpoint_from_torch(
    template: tuple[dict[str, np.ndarray], dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    dtype: np.dtype[Any],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fill a fresh session's checkpoint state (arrays, ``state`` JSON) from torch's.

    torch keeps state per parameter; where the parameters of a group have diverged (a
    parameter left out of some steps has a smaller ``step``), the group becomes *parts*
    of parameters with equal scalars, as the server keeps such a group.
    """
    template_arrays, template_meta = template
    meta = copy.deepcopy(template_meta)
    # Held parameters were uploaded with the template: they are the current values.
    arrays = {n: a for n, a in template_arrays.items() if not n.startswith("state/")}
    for gi, group in enumerate(optimizer.param_groups):
        prefix = f"state/group{gi}/"
        template_record = meta["optimizer_state"][gi]
        params = group["params"]
        states = [optimizer.state.get(p, {}) for p in params]
        fresh_arrays = _per_param_arrays(template_record, template_arrays, prefix, params)
        scalars = [_scalars_from_torch(template_record, s, scheduler) for s in states]
        parts: dict[str, list[int]] = {}
        for position, signature in enumerate(scalars):
            parts.setdefault(repr(sorted(signature.items())), []).append(position)
        entries = []
        for k, positions in enumerate(parts.values()):
            record = copy.deepcopy(template_record)
            record.update(scalars[positions[0]])
            part_prefix = prefix if len(parts) == 1 else f"{prefix}part{k}/"
            for field, kind in list(record[LAYOUT].items()):
                if kind == "array" or not kind:
                    if kind == "array":
                        arrays[part_prefix + field] = template_arrays[prefix + field]
                    continue
                owners = [p for p in positions if _ONLY_FOR.get(field, _any)(params[p])]
                found = [
                    _array(states[p][field], dtype)
                    if states[p].get(field) is not None
                    else fresh_arrays[p].get(field)
                    for p in owners
                ]
                kept = [a for a in found if a is not None]
                record[LAYOUT][field] = len(kept)
                if kept and len(kept) != len(found):
                    raise ConversionError(f"some tensors of group {gi} lack {field!r}")
                for j, array in enumerate(kept):
                    arrays[f"{part_prefix}{field}.{j}"] = array
            entries.append({"positions": positions, "state": record})
        if len(entries) == 1:
            meta["optimizer_state"][gi] = entries[0]["state"]
        else:
            meta["optimizer_state"][gi] = {"parts": entries}
        hparams = meta["groups"][gi]
        for key in hparams:
            if key in group:
                hparams[key] = _plain(group[key])
    steps = [
        int(r["step"])
        for record in meta["optimizer_state"]
        for r in _records(record)
        if isinstance(r.get("step"), int)
    ]
    meta["step"] = max(steps) if steps else 0
    meta["since_schedule"] = 0
    if scheduler is not None:
        if meta.get("schedule_state") is None:
            raise ConversionError("a scheduler was given but the session has no schedule")
        meta["schedule_state"] = _schedule_state_from_torch(
            meta["schedule_state"], scheduler.state_dict()
        )
    return arrays, meta


def _records(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A group's state records: the one record, or each part's."""
    if "parts" in record:
        return [entry["state"] for entry in record["parts"]]
    return [record]


def _scalars_from_torch(
    template: Mapping[str, Any], state: Mapping[str, Any], scheduler: Any
) -> dict[str, Any]:
    """The JSON scalars of one parameter's torch state, in the template's fields."""
    values: dict[str, Any] = {}
    for field, current in template.items():
        if field == LAYOUT:
            continue
        if field in state:
            values[field] = _json_like(state[field], current)
        elif field == "step" and state:
            # torch's SGD keeps no step count, only its buffers; the count matters only
            # as "not the first step", so the scheduler's count (or 1) stands in.
            values[field] = max(1, _scheduler_steps(scheduler))
    return values


def _per_param_arrays(
    record: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    prefix: str,
    params: Sequence[torch.Tensor],
) -> list[dict[str, np.ndarray]]:
    """A fresh group's arrays (the template's), by parameter position and field."""
    per_param: list[dict[str, np.ndarray]] = [{} for _ in params]
    for field, count in record[LAYOUT].items():
        if count == "array" or not count:
            continue
        owners = [k for k, p in enumerate(params) if _ONLY_FOR.get(field, _any)(p)]
        for j, owner in enumerate(owners[:count]):
            per_param[owner][field] = arrays[f"{prefix}{field}.{j}"]
    return per_param


def _scheduler_steps(scheduler: Any) -> int:
    last_epoch = getattr(scheduler, "last_epoch", 0)
    return last_epoch if isinstance(last_epoch, int) else 0


def _schedule_state_from_torch(template: dict[str, Any], torch_state: Mapping[str, Any]) -> Any:
    out: dict[str, Any] = {}
    for key, current in template.items():
        torch_key = _torch_key(key, torch_state)
        if torch_key is None:
            raise ConversionError(f"the torch scheduler's state has no {key!r}")
        value = torch_state[torch_key]
        if key == "schedulers":
            out[key] = [
                _schedule_state_from_torch(t, s) for t, s in zip(current, value, strict=True)
            ]
        else:
            out[key] = _json_like(value, current)
    return out


# State: checkpoint -> torch


def build_optimizer(
    name: str,
    groups: Sequence[tuple[list[torch.Tensor], list[str], dict[str, Any]]],
) -> torch.optim.Optimizer:
    cls: Any = getattr(torch.optim, name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ConversionError(f"torch.optim has no optimizer {name}")
    torch_groups = [
        {"params": list(zip(names, tensors, strict=True)), **_torch_hparams(hp)}
        for tensors, names, hp in groups
    ]
    # Every group carries all of its hyperparameters, so the constructor needs no others.
    optimizer: torch.optim.Optimizer = cast(Any, cls)(torch_groups)
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any]) -> Any:
    config = dict(config)
    name = config.pop("name")
    config.pop("interval", None)
    config.pop("every", None)
    cls = getattr(torch.optim.lr_scheduler, name, None)
    if cls is None:
        raise ConversionError(f"torch.optim.lr_scheduler has no {name}")
    if name in _COMPOSITES:
        children = [build_scheduler(optimizer, c) for c in config.pop("schedulers")]
        if name == "ChainedScheduler":
            return cls(children, optimizer=optimizer)
        return cls(optimizer, children, **config)
    return cls(optimizer, **config)


def load_into_torch(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> None:
    """Put a checkpoint's optimizer and schedule state into freshly built torch objects."""
    state: dict[int, dict[str, Any]] = {}
    packed_groups = []
    index = 0
    # Never stepped: keep what the constructor made (Adagrad fills its accumulators there;
    # SGD must see no momentum buffer on its first step).
    fresh = all(
        r.get("step", 0) == 0 for record in meta["optimizer_state"] for r in _records(record)
    )
    # torch keeps step counts (and ASGD's eta, mu) as 0-d tensors of this dtype.
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for gi, group in enumerate(optimizer.param_groups):
        prefix = f"state/group{gi}/"
        record = meta["optimizer_state"][gi]
        params = group["params"]
        per_param: list[dict[str, Any]] = [{} for _ in params]
        if "parts" in record:
            parts = [
                ([int(p) for p in entry["positions"]], entry["state"], f"{prefix}part{k}/")
                for k, entry in enumerate(record["parts"])
            ]
        else:
            parts = [(list(range(len(params))), record, prefix)]
        for positions, part, part_prefix in parts:
            for field, count in part[LAYOUT].items():
                if count == "array" or not count:
                    continue
                owners = [p for p in positions if _ONLY_FOR.get(field, _any)(params[p])]
                if len(owners) != count:
                    raise ConversionError(f"cannot tell which tensors {field!r} belongs to")
                for k, owner in enumerate(owners):
                    per_param[owner][field] = torch.from_numpy(
                        np.array(arrays[f"{part_prefix}{field}.{k}"], copy=True)
                    )
            for field, value in part.items():
                if field == LAYOUT or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                for p in positions:
                    per_param[p][field] = torch.tensor(float(value), dtype=scalar_dtype)
        for entry in per_param:
            state[index] = entry
            index += 1
        hparams = _torch_hparams(meta["groups"][gi])
        packed_groups.append(
            {**hparams, "params": list(range(index - len(params), index)), **_names(group)}
        )
    if fresh:
        state = optimizer.state_dict()["state"]
    optimizer.load_state_dict({"state": state, "param_groups": packed_groups})
    if scheduler is not None:
        scheduler.load_state_dict(
            _schedule_state_to_torch(meta["schedule_state"], scheduler.state_dict())
        )


def _schedule_state_to_torch(core: Mapping[str, Any], torch_state: Mapping[str, Any]) -> Any:
    out = dict(torch_state)
    for key, value in core.items():
        torch_key = _torch_key(key, torch_state)
        if torch_key is None:
            raise ConversionError(f"torch's scheduler keeps no {key!r}")
        if key == "schedulers":
            out[torch_key] = [
                _schedule_state_to_torch(c, t)
                for c, t in zip(value, torch_state[torch_key], strict=True)
            ]
        else:
            out[torch_key] = _torch_like(value, torch_state[torch_key])
    return out


# Values


def _torch_key(key: str, torch_state: Mapping[str, Any]) -> str | None:
    for candidate in (key, "_" + key):
        if candidate in torch_state:
            return candidate
    return None


def _any(_: torch.Tensor) -> bool:
    return True


def _names(group: Mapping[str, Any]) -> dict[str, Any]:
    return {"param_names": list(group["param_names"])} if "param_names" in group else {}


def _array(value: Any, dtype: np.dtype[Any]) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"expected a tensor in the optimizer state, got {type(value)}")
    return np.asarray(value.detach().to("cpu", torch.float64).numpy(), dtype=dtype, order="C")


def _plain(value: Any) -> Any:
    """A torch-side value as JSON: tensors to numbers, tuples and Counters to lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, Counter):
        return sorted(value.elements())
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _json_like(value: Any, current: Any) -> Any:
    value = _plain(value)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        return int(value) if value.is_integer() else value
    return value


def _torch_like(value: Any, current: Any) -> Any:
    if isinstance(value, str) and isinstance(current, float):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _torch_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in hparams.items():
        if key in ("params", "param_names"):
            continue
        out[key] = tuple(value) if key == "betas" and isinstance(value, list) else value
    return out
