"""Run a session config in real torch.optim: the reference every parity test compares to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tests.core.parity_inputs import Inputs
from tests.core.reference_classes import reference_class

SCHEDULE_OPTIONS = ("interval", "every")
MANUAL_PERIOD = 10
"""Manual schedules are stepped after every this many optimizer steps in parity runs."""


def _class_by_name(module: Any, name: str) -> Any:
    for attr in dir(module):
        if attr.lower() == name.lower():
            return getattr(module, attr)
    raise KeyError(name)


def build_scheduler(torch: Any, optimizer: Any, config: Mapping[str, Any]) -> Any:
    sched_module = torch.optim.lr_scheduler
    kwargs = {k: v for k, v in config.items() if k not in ("name", *SCHEDULE_OPTIONS)}
    if "schedulers" in kwargs:
        kwargs["schedulers"] = [build_scheduler(torch, optimizer, s) for s in kwargs["schedulers"]]
    cls = _class_by_name(sched_module, config["name"])
    if cls is sched_module.ChainedScheduler:
        return cls(kwargs["schedulers"], optimizer=optimizer)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(optimizer, **kwargs)


def _constructor_args(config: Mapping[str, Any]) -> dict[str, Any]:
    args = {k: v for k, v in config.items() if k != "name"}
    for key in ("betas", "etas", "step_sizes", "eps"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    return args


def _torch_group(entry: Mapping[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    extra = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in entry.items()
        if k not in ("params", "optimizer")
    }
    return {"params": [tensors[n] for n in entry["params"]], **extra}


def _construct(torch: Any, config: Mapping[str, Any], groups: list[dict[str, Any]]) -> Any:
    optimizer = reference_class(config["name"])(groups, **_constructor_args(config))
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # schedule-free: parameters hold the training point y
    return optimizer


def build_optimizers(torch: Any, config: Mapping[str, Any], tensors: dict[str, Any]) -> list[Any]:
    """One torch optimizer per group family: the session's ``optimizer`` over the default
    group and every group without its own, then one per group naming its own."""
    listed: set[str] = set()
    shared: list[dict[str, Any]] = []
    own: list[Any] = []
    for g in config.get("param_groups") or []:
        listed.update(g["params"])
        if "optimizer" in g:
            own.append(_construct(torch, g["optimizer"], [_torch_group(g, tensors)]))
        else:
            shared.append(_torch_group(g, tensors))
    default = [t for n, t in tensors.items() if n not in listed]
    if default:
        shared.insert(0, {"params": default})
    first = [_construct(torch, config["optimizer"], shared)] if shared else []
    return first + own


def build_optimizer(torch: Any, config: Mapping[str, Any], tensors: dict[str, Any]) -> Any:
    """The one torch optimizer of a session whose groups share the session's optimizer."""
    (optimizer,) = build_optimizers(torch, config, tensors)
    return optimizer


def run_torch(config: Mapping[str, Any], inputs: Inputs) -> dict[str, np.ndarray]:
    """Final parameters after ``inputs.steps`` steps of torch.optim on ``config``."""
    import torch

    # One thread: tiny tensors run faster, and the numbers do not depend on the machine's
    # core count, so the committed fixtures compare bit for bit anywhere.
    torch.set_num_threads(1)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.get("dtype", "float32")]
    tensors = {
        name: torch.tensor(value, dtype=dtype, requires_grad=True)
        for name, value in inputs.initial.items()
    }
    optimizers = build_optimizers(torch, config, tensors)
    schedule = config.get("schedule")
    # One scheduler per torch optimizer, all built with the same arguments.
    schedulers = [build_scheduler(torch, o, schedule) for o in optimizers] if schedule else []
    interval = (schedule or {}).get("interval", "step")
    every = (schedule or {}).get("every", 1)
    needs_metric = schedule is not None and schedule["name"].lower() == "reducelronplateau"
    for n in range(inputs.steps):
        for name, t in tensors.items():
            given = inputs.grads[n].get(name)
            t.grad = None if given is None else torch.tensor(given, dtype=dtype)
        grads = [t.grad for t in tensors.values()]
        if config.get("clip_grad_value"):
            torch.nn.utils.clip_grad_value_(
                list(tensors.values()), config["clip_grad_value"]["clip_value"]
            )
        if config.get("clip_grad_norm"):
            clip = config["clip_grad_norm"]
            torch.nn.utils.clip_grad_norm_(
                list(tensors.values()), clip["max_norm"], clip.get("norm_type", 2.0)
            )
        del grads
        for optimizer in optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                # max_iter=1 without line search calls the closure exactly once per step.
                loss = torch.tensor(inputs.losses[n], dtype=dtype)
                optimizer.step(lambda loss=loss: loss)
            else:
                optimizer.step()
        metric = [inputs.losses[n]] if needs_metric else []
        due = interval == "step" and (n + 1) % every == 0
        due = due or (interval == "manual" and (n + 1) % MANUAL_PERIOD == 0)
        for scheduler in schedulers if due else []:
            scheduler.step(*metric)
    return {name: t.detach().numpy().copy() for name, t in tensors.items()}
