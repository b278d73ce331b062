"""torch's optimizer test database (``optim_db``) as cases for the server, and torch's runs.

``torch.testing._internal.common_optimizers.optim_db`` is what torch's own optimizer tests
iterate over: every optimizer with its CPU inputs (hyperparameter sets) and the scheduler
combinations torch steps it with. Each input becomes cases that differ in

- **groups**: the input's kwargs given to the constructor (one group), or given to a first
  param group of two while the constructor keeps its defaults and the second group
  overrides only ``lr``, as torch's param-group tests build them;
- **schedule**: none, or one of the optimizer's ``scheduler_inputs``. Each is a list of
  schedulers stepping the same optimizer after every step; a list of one is that schedule,
  a longer list is ChainedScheduler (the same thing, in one config). A list holding
  ReduceLROnPlateau beside another scheduler cannot be one optserve schedule
  (ChainedScheduler refuses ReduceLROnPlateau, as torch's does); it is a refused case,
  and each of its schedulers also runs alone.

The device-only flags torch's helper adds (``differentiable``, ``fused`` where the CPU has
a fused kernel) run without groups or schedule: the server gets the flag (and ignores it:
the flags choose torch's kernels, not the update rule), torch runs its default
implementation.

Importing this module needs torch and its test utilities (``expecttest``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.testing._internal.common_optimizers import (
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from service.core import optimizers, schedules

DEVICE_FLAGS = ("foreach", "fused", "capturable", "differentiable")
SHAPES = {"w": (4, 3), "b": (3,), "v": (2, 3, 2)}
SHAPES_2D = {"w": (4, 3), "u": (3, 5), "v": (2, 2)}
"""Muon optimizes 2-D tensors only."""
FIRST_GROUP = 2
"""Tensors in the first of two param groups (the input's kwargs); the rest form the second."""

SchedulerMaker = Callable[[torch.optim.Optimizer], Any]


@dataclass(frozen=True)
class Refusal:
    """A case the server answers 422, as docs/torch-compatibility.md lists it."""

    detail: str
    """A phrase of the server's problem detail (torch's message where torch has one)."""
    torch_refuses: bool
    """torch refuses it too, with ``detail`` in its message."""


@dataclass
class Case:
    id: str
    optimizer: str
    kwargs: dict[str, Any]
    """The input's kwargs, in torch's form (tensors and tuples as torch takes them)."""
    groups: bool
    schedulers: list[SchedulerMaker] = field(default_factory=list)
    flag: str | None = None
    refusal: Refusal | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return SHAPES_2D if self.optimizer == "Muon" else SHAPES

    @property
    def is_lbfgs(self) -> bool:
        return self.optimizer == "LBFGS"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value.item())
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _default_lr(name: str) -> float:
    lr = next(a.default for a in optimizers.get(name).args if a.name == "lr")
    return float(lr)


def _torch_kwargs(case: Case) -> dict[str, Any]:
    """What torch's run gets: the device flags at their defaults, a Tensor lr in float64.

    torch computes with a Tensor lr in the tensor's dtype (a schedule's new lr, Muon's
    ``1 - lr * weight_decay``), so optim_db's float32 tensor on float64 params rounds those
    to float32. optserve's lr is a number in the session's dtype: torch's numbers with a
    Tensor lr of that dtype (docs/torch-compatibility.md). LBFGS is compared with a float
    lr: its state's step length *is* a Tensor lr, which a scheduler then rewrites in place.
    """
    kwargs = {k: v for k, v in case.kwargs.items() if k not in DEVICE_FLAGS}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            kwargs[k] = float(v.item()) if case.is_lbfgs else v.to(torch.float64)
    return kwargs


def second_group_lr(case: Case) -> float:
    return _default_lr(case.optimizer) / 2


# ---- the server's config ----------------------------------------------------------------


def _schedule_args(scheduler: Any) -> dict[str, Any]:
    """A constructed torch scheduler's arguments, read back under optserve's names."""
    name = type(scheduler).__name__
    config: dict[str, Any] = {"name": name}
    for arg in schedules.get(name).args:
        if arg.name == "last_epoch":
            continue
        if arg.name == "min_lr":
            mins = set(scheduler.min_lrs)
            assert len(mins) == 1, "one min_lr for every group"
            config["min_lr"] = mins.pop()
            continue
        config[arg.name] = _jsonable(vars(scheduler)[arg.name])
    return config


def schedule_config(makers: Sequence[SchedulerMaker]) -> dict[str, Any] | None:
    if not makers:
        return None
    probe = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    children = [_schedule_args(make(probe)) for make in makers]
    if len(children) == 1:
        return children[0]
    return {"name": "ChainedScheduler", "schedulers": children}


def session_config(case: Case, initial: dict[str, np.ndarray]) -> dict[str, Any]:
    """The create body: held float64 params, the optimizer, groups and schedule."""
    kwargs = {k: _jsonable(v) for k, v in case.kwargs.items()}
    names = list(initial)
    config: dict[str, Any] = {
        "optimizer": {"name": case.optimizer},
        "params": {n: {"shape": list(a.shape), "data": a.tolist()} for n, a in initial.items()},
        "dtype": "float64",
    }
    if case.groups:
        config["param_groups"] = [
            {"params": names[:FIRST_GROUP], **kwargs},
            {"params": names[FIRST_GROUP:], "lr": second_group_lr(case)},
        ]
    else:
        config["optimizer"].update(kwargs)
    schedule = schedule_config(case.schedulers)
    if schedule is not None:
        config["schedule"] = schedule
    return config


# ---- torch's run --------------------------------------------------------------------------


def objective(tensors: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """A smooth, mildly non-quadratic loss, so that LBFGS's line search has work to do."""
    loss = torch.zeros((), dtype=torch.float64)
    for p, t in zip(tensors, targets, strict=True):
        loss = loss + ((p - t) ** 2).sum() + 0.1 * (p**4).sum()
    return loss


def loss_and_grads(
    values: dict[str, np.ndarray], targets: Sequence[torch.Tensor]
) -> tuple[float, dict[str, np.ndarray]]:
    """The objective and its gradient at ``values``, as the client of a session computes them."""
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values.values()]
    loss = objective(tensors, targets)
    loss.backward()
    grads = {n: t.grad.numpy() for n, t in zip(values, tensors, strict=True)}
    return float(loss.item()), grads


def build_torch_optimizer(case: Case, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, case.optimizer)
    kwargs = _torch_kwargs(case)
    if case.groups:
        groups = [
            {"params": tensors[:FIRST_GROUP], **kwargs},
            {"params": tensors[FIRST_GROUP:], "lr": second_group_lr(case)},
        ]
        return cls(groups)
    return cls(tensors, **kwargs)


def run_torch(
    case: Case, initial: dict[str, np.ndarray], targets: Sequence[torch.Tensor], steps: int
) -> dict[str, np.ndarray]:
    """torch's loop: step, then every scheduler (ReduceLROnPlateau with the step's loss)."""
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in initial.values()]
    opt = build_torch_optimizer(case, tensors)
    scheds = [make(opt) for make in case.schedulers]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(tensors, targets)
        loss.backward()
        return loss

    for _ in range(steps):
        if case.is_lbfgs:
            loss = opt.step(closure)  # the loss of the first closure call
        else:
            loss = closure()
            opt.step()
        for s in scheds:
            if isinstance(s, ReduceLROnPlateau):
                s.step(float(loss.detach()))
            else:
                s.step()
    return {n: t.detach().numpy().copy() for n, t in zip(initial, tensors, strict=True)}


def torch_refusal(case: Case) -> str | None:
    """torch's message when its constructor refuses the case, else None."""
    tensors = [
        torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in case.shapes.values()
    ]
    try:
        opt = build_torch_optimizer(case, tensors)
        for make in case.schedulers:
            make(opt)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


# ---- enumeration --------------------------------------------------------------------------

LBFGS_GROUPS = Refusal("LBFGS doesn't support per-parameter options (parameter groups)", True)
PLATEAU_CHAINED = Refusal(
    "ChainedScheduler does not support `ReduceLROnPlateau` scheduler", torch_refuses=False
)


def _scheduler_label(makers: Sequence[SchedulerMaker]) -> str:
    probe = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    return "+".join(type(make(probe)).__name__ for make in makers)


def _has_plateau(makers: Sequence[SchedulerMaker]) -> bool:
    probe = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    return any(isinstance(make(probe), ReduceLROnPlateau) for make in makers)


def _schedule_variants(info: Any) -> list[tuple[str, list[SchedulerMaker], Refusal | None]]:
    variants: list[tuple[str, list[SchedulerMaker], Refusal | None]] = [("none", [], None)]
    for index, makers in enumerate(info.scheduler_inputs):
        label = f"s{index}:{_scheduler_label(makers)}"
        if len(makers) > 1 and _has_plateau(makers):
            variants.append((label, list(makers), PLATEAU_CHAINED))
            for j, make in enumerate(makers):
                variants.append((f"{label}[{j}]alone:{_scheduler_label([make])}", [make], None))
        else:
            variants.append((label, list(makers), None))
    return variants


def _desc(text: str) -> str:
    return text.replace(" ", "_").replace(",", "").replace("&", "+")


def cases() -> list[Case]:
    """Every case, in optim_db's order."""
    out: list[Case] = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name == "SparseAdam":
            continue  # optserve's gradients are dense
        # On the CPU torch's helper adds `differentiable`, and `fused` where there is a kernel.
        inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float64, info)
        variants = _schedule_variants(info)
        for number, given in enumerate(inputs):
            kwargs = copy.deepcopy(given.kwargs)
            flags = [f for f in DEVICE_FLAGS if kwargs.get(f)]
            stem = f"{name}-{number}:{_desc(given.desc)}"
            if flags:
                out.append(Case(stem, name, kwargs, groups=False, flag=flags[0]))
                continue
            kwargs = {k: v for k, v in kwargs.items() if k not in DEVICE_FLAGS}
            for groups in (False, True):
                for label, makers, refusal in variants:
                    if groups and name == "LBFGS":
                        refusal = LBFGS_GROUPS
                    out.append(
                        Case(
                            f"{stem}-{'groups' if groups else 'one_group'}-{label}",
                            name,
                            kwargs,
                            groups,
                            makers,
                            refusal=refusal,
                        )
                    )
    return out
