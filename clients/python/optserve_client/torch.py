"""``RemoteOptimizer``: a ``torch.optim.Optimizer`` whose update runs on an optserve server.

::

    opt = RemoteOptimizer(
        model.named_parameters(),
        url="http://127.0.0.1:8000",
        optimizer={"name": "AdamW", "lr": 1e-3, "weight_decay": 0.01},
        schedule={"name": "CosineAnnealingLR", "T_max": 1000},
        param_groups=[{"params": ["fc.bias"], "weight_decay": 0.0}],
    )
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()          # gradients out, deltas in, applied in place
        opt.zero_grad()

The server keeps the optimizer state and the schedule; ``param_groups[i]["lr"]`` follows
the server's current learning rates after every step. LBFGS closures work as in torch:
the session holds the parameters and every closure call becomes one ask/tell exchange.
``state_dict()`` embeds the server's checkpoint; ``load_state_dict()`` restores it into a
fresh session. ``from_torch`` and ``to_torch`` move a run between a local torch optimizer
(and scheduler) and the server mid-training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from optserve_client import safetensors
from optserve_client._torch_state import (
    ConversionError,
    build_optimizer,
    build_scheduler,
    check_convertible,
    checkpoint_from_torch,
    load_into_torch,
    optimizer_config,
    schedule_config,
)
from optserve_client._wire import StepResult, Wire
from optserve_client.client import Client, Session
from optserve_client.errors import ProtocolError

__all__ = ["ConversionError", "RemoteOptimizer", "proximal_term"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LBFGS = "lbfgs"
_SCHEDULE_FREE = ("adamwschedulefree", "sgdschedulefree")
_NOT_IN_TRAIN_MODE = (
    "Optimizer was not in train mode when step is called. "
    "Please insert .train() and .eval() calls on the "
    "optimizer. See documentation for details."
)
"""The schedulefree package's words, for the same mistake."""


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer backed by an optserve session.

    ``params`` is what torch optimizers take: ``model.named_parameters()`` (the names
    become the session's tensor names), plain tensors (named ``param0``, ``param1``, ...)
    or torch-style group dicts (``[{"params": [...], "weight_decay": 0.0}, ...]``).
    A group dict may name its own optimizer, ``"optimizer": "Muon"`` (or
    ``{"name": "Muon", ...constructor args}``): the session then steps that group as torch
    steps one optimizer per group family, and ``optimizer=`` may be left out when every
    group names one (the first group's becomes the session's).
    ``param_groups`` instead names tensors, in the server's format. ``optimizer``,
    ``schedule``, ``clip_grad_norm``, ``clip_grad_value`` and ``nonfinite`` are the
    session config of the HTTP API. ``dtype`` defaults to float64 when every parameter
    is float64, else float32. ``hold_params`` (default: only for LBFGS) makes the session
    keep its own copy of the parameters; steps then copy the server's values in.

    Schedule-free optimizers (``AdamWScheduleFree``, ``SGDScheduleFree``) hold the
    parameters by default and switch as the schedulefree package's do: they start in
    eval mode, ``train()`` puts the training point in the tensors and must come before
    ``step()``, ``eval()`` puts the evaluation point there (``GET .../params?eval=true``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        optimizer: Mapping[str, Any] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
        schedule: Mapping[str, Any] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        clip_grad_norm: Mapping[str, Any] | float | None = None,
        clip_grad_value: Mapping[str, Any] | float | None = None,
        dtype: str | None = None,
        nonfinite: str | None = None,
        labels: Mapping[str, str] | None = None,
        hold_params: bool | None = None,
        wire: Wire = "safetensors",
        session: Session | str | None = None,
    ) -> None:
        names, tensors, server_groups, shared = _layout(params, param_groups)
        # One torch-style group's options are simply the optimizer's (LBFGS allows no groups).
        optimizer = {**_session_optimizer(optimizer, server_groups), **shared}
        self.names: list[str] = names
        self._tensor_of = dict(zip(names, tensors, strict=True))
        self._owns_client = client is None
        self.client = client if client is not None else Client(url, api_key=api_key, wire=wire)
        self._is_lbfgs = str(optimizer.get("name", "")).lower() == _LBFGS
        self._is_schedule_free = str(optimizer.get("name", "")).lower() in _SCHEDULE_FREE
        self._train_mode = False
        """Schedule-free only: whether the tensors hold the training point."""
        default_holds = self._is_lbfgs or self._is_schedule_free
        self._holds = default_holds if hold_params is None else hold_params
        if dtype is None:
            dtype = "float64" if all(t.dtype == torch.float64 for t in tensors) else "float32"
        self._owns_session = session is None
        try:
            if session is None:
                values = _initial_values(names, tensors, dtype) if self._holds else None
                session = self.client.create_session(
                    optimizer,
                    values if values is not None else _shapes(names, tensors),
                    schedule=schedule,
                    param_groups=server_groups or None,
                    dtype=dtype,
                    clip_grad_norm=clip_grad_norm,
                    clip_grad_value=clip_grad_value,
                    nonfinite=nonfinite,
                    labels=labels,
                    hold_params=self._holds,
                    # torch leaves a parameter whose grad is None out of step(); so does this
                    # session, rather than stepping it with a zero gradient.
                    missing_grads="skip",
                )
            elif isinstance(session, str):
                session = self.client.session(session)
        except BaseException:
            if self._owns_client:
                self.client.close()
            raise
        self.session: Session = session
        self._holds = session.holds_params
        _check_tensors(session, names, tensors)
        self._torch_dtype = _DTYPES[session.dtype.name]

        resolved = {
            k: _number(v) for k, v in session.document.get("optimizer", {}).items() if k != "name"
        }
        server = _server_groups(session)
        # torch fills every group's missing keys from ``defaults``: keep only the names every
        # group has, so that a Muon group does not gain AdamW's betas.
        resolved = {k: v for k, v in resolved.items() if all(k in h for _, h in server)}
        torch_groups = [
            {**hparams, "params": [self._tensor_of[n] for n in members], "param_names": members}
            for members, hparams in server
        ]
        self._constructing = True
        super().__init__(torch_groups, resolved)
        self._constructing = False
        self._absorb_session()

    # torch.optim.Optimizer API

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; after construction the tensors join the session as
        a new group (with their values, when the session holds the parameters)."""
        if getattr(self, "_constructing", True):
            super().add_param_group(param_group)
            return
        given = dict(param_group)
        members = given.pop("params")
        tensors = [members] if isinstance(members, torch.Tensor) else list(members)
        names = given.pop("param_names", None) or self._fresh_names(len(tensors))
        options = {k: _plain(v) for k, v in given.items()}
        if isinstance(options.get("optimizer"), str):
            options["optimizer"] = {"name": options["optimizer"]}  # the server's form
        super().add_param_group({**param_group, "param_names": list(names)})
        try:
            if self._holds:
                values = _initial_values(names, tensors, self.session.dtype.name)
                self.session.add_group(dict(values), **options)
            else:
                self.session.add_group(_shapes(names, tensors), **options)
        except BaseException:
            self.param_groups.pop()
            raise
        self.names.extend(names)
        self._tensor_of.update(zip(names, tensors, strict=True))
        self._absorb_session()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Send the gradients, apply the server's update in place; return the closure's loss.

        For LBFGS the closure is required and may be called several times, at the points
        the server asks for, exactly as ``torch.optim.LBFGS.step`` calls it.
        """
        if self._is_lbfgs:
            return self._ask_tell_step(closure)
        if self._is_schedule_free and not self._train_mode:
            raise Exception(_NOT_IN_TRAIN_MODE)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._send_group_edits()
        self._exchange(loss)
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        """Schedule-free: put the evaluation point ``x`` in the tensors (the server's
        ``GET .../params?eval=true``). Other optimizers evaluate where they step: no-op."""
        if self._is_schedule_free and self._train_mode:
            self._copy_in(self.session.params(evaluation=True))
            self._train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Schedule-free: put the training point ``y`` back in the tensors, as held by the
        server (exactly, where the package's ``train()`` interpolates back). Other
        optimizers: no-op."""
        if self._is_schedule_free and not self._train_mode:
            self._copy_in(self.session.params())
            self._train_mode = True

    def _copy_in(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            tensor = self._tensor_of[name]
            tensor.copy_(torch.from_numpy(value).to(tensor.device, tensor.dtype))

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state``, ``param_groups``) plus ``optserve``: the server's
        checkpoint of the session (bytes) and where it came from."""
        packed = super().state_dict()
        packed["optserve"] = {
            "checkpoint": self.session.state(),
            "session": self.session.id,
            "names": list(self.names),
        }
        return packed

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``'s checkpoint in a new session of this server."""
        saved = state_dict.get("optserve")
        if not isinstance(saved, Mapping) or not isinstance(saved.get("checkpoint"), bytes):
            raise ValueError(
                "not a RemoteOptimizer state dict (no optserve checkpoint); to continue a "
                "local torch optimizer use RemoteOptimizer.from_torch"
            )
        restored = self.client.restore(saved["checkpoint"])
        _check_tensors(restored, self.names, [self._tensor_of[n] for n in self.names])
        self._replace_session(restored)

    # Moving between local torch and the server

    @classmethod
    def from_torch(
        cls,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
        schedule: Mapping[str, Any] | None = None,
        schedule_options: Mapping[str, Any] | None = None,
        clip_grad_norm: Mapping[str, Any] | float | None = None,
        clip_grad_value: Mapping[str, Any] | float | None = None,
        dtype: str | None = None,
        nonfinite: str | None = None,
        labels: Mapping[str, str] | None = None,
        wire: Wire = "safetensors",
    ) -> RemoteOptimizer:
        """A session that continues ``optimizer`` (and ``scheduler``) exactly.

        The optimizer's class, hyperparameters, groups and state, and the scheduler's
        arguments and position, are carried over; from here on call ``step()`` on the
        returned object instead of on the two torch objects. Tensor names are the
        optimizer's ``param_names`` when it was built from ``named_parameters()``. The
        schedule's arguments are read back from the scheduler where torch keeps them;
        otherwise pass ``schedule={...}``. ``schedule_options`` adds ``interval`` or
        ``every`` (the default, ``"step"``, is a ``scheduler.step()`` after every step).
        """
        name = type(optimizer).__name__
        check_convertible(name)
        owns_client = client is None
        client = client if client is not None else Client(url, api_key=api_key, wire=wire)
        catalog = {e["name"]: [a["name"] for a in e["args"]] for e in client.optimizers()}
        if name not in catalog:
            raise ConversionError(f"optserve has no optimizer {name}")
        config, groups, names = optimizer_config(optimizer, catalog[name])
        schedule_cfg: dict[str, Any] | None = None
        if schedule is not None:
            schedule_cfg = {**schedule, **(schedule_options or {})}
        elif scheduler is not None:
            schedules = {e["name"]: [a["name"] for a in e["args"]] for e in client.schedules()}
            schedule_cfg = schedule_config(scheduler, schedules, schedule_options or {})
        tensors = [p for g in optimizer.param_groups for p in g["params"]]
        flat_names = [n for group_names in names for n in group_names]
        if dtype is None:
            dtype = "float64" if all(t.dtype == torch.float64 for t in tensors) else "float32"
        template = client.create_session(
            config,
            _shapes(flat_names, tensors),
            schedule=schedule_cfg,
            param_groups=groups,
            dtype=dtype,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            nonfinite=nonfinite,
            labels=labels,
            missing_grads="skip",
        )
        try:
            arrays, metadata = safetensors.decode(template.state())
        finally:
            template.delete()
        filled, meta = checkpoint_from_torch(
            (arrays, json.loads(metadata["state"])), optimizer, scheduler, template.dtype
        )
        metadata = {**metadata, "state": json.dumps(meta), "step": str(meta["step"])}
        session = client.restore(safetensors.encode(filled, metadata))
        remote = cls(
            list(zip(flat_names, tensors, strict=True)),
            optimizer={"name": name},
            client=client,
            session=session,
        )
        remote._owns_client = owns_client
        remote._owns_session = True
        return remote

    def to_torch(self) -> tuple[torch.optim.Optimizer, Any]:
        """A local torch optimizer (and scheduler, if the session has a schedule) that
        continue this session exactly, on the same tensors.

        Clipping is not part of a torch optimizer: a session's ``clip_grad_norm`` or
        ``clip_grad_value`` becomes the caller's ``torch.nn.utils.clip_grad_*_`` call.
        A schedule with ``interval: "manual"`` or ``every`` is stepped as configured.
        """
        document = self.session.refresh().document
        name = str(document["optimizer"]["name"])
        check_convertible(name)
        families = {str(g.get("optimizer", name)) for g in document.get("param_groups", [])}
        if len(families) > 1:
            raise ConversionError(
                f"session {self.session.id} steps its groups with {', '.join(sorted(families))}; "
                "to_torch builds one torch optimizer and cannot hold groups of several "
                "optimizers: keep stepping it remotely"
            )
        arrays, metadata = safetensors.decode(self.session.state())
        groups = [
            ([self._tensor_of[n] for n in members], members, hparams)
            for members, hparams in _server_groups(self.session)
        ]
        optimizer = build_optimizer(name, groups)
        schedule = document.get("schedule")
        scheduler = build_scheduler(optimizer, schedule) if schedule else None
        load_into_torch(optimizer, scheduler, arrays, json.loads(metadata["state"]))
        return optimizer, scheduler

    # Lifecycle

    def close(self, *, delete: bool = False) -> None:
        """Release the HTTP connection (if this object made it); ``delete`` the session too."""
        if delete:
            self.session.delete()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals

    def _replace_session(self, session: Session) -> None:
        old, owned = self.session, self._owns_session
        self.session, self._owns_session = session, True
        self._holds = session.holds_params
        self._absorb_session()
        if owned and old.id != session.id:
            old.delete()

    def _absorb_session(self) -> None:
        """Take the session document's groups as what the server has: ``param_groups`` get
        its hyperparameters, and later edits of any of them are found against it."""
        document = self.session.document
        self._send_params = not self._holds and bool(document.get("needs_params"))
        self._server_hparams = [hparams for _, hparams in _server_groups(self.session)]
        for group, server in zip(self.param_groups, self._server_hparams, strict=True):
            for key, value in server.items():
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
        self._sync_lrs(self.session.lr)

    def _sync_lrs(self, lrs: Sequence[float]) -> None:
        if len(lrs) == len(self.param_groups):
            for group, server, lr in zip(self.param_groups, self._server_hparams, lrs, strict=True):
                group["lr"] = lr
                server["lr"] = lr

    def _send_group_edits(self) -> None:
        """Send what the loop changed in ``param_groups`` since the server last said (a hand
        edit, or any torch scheduler stepping this optimizer): torch's last writer wins."""
        edits = [
            (index, changed)
            for index, (group, server) in enumerate(
                zip(self.param_groups, self._server_hparams, strict=True)
            )
            if (changed := _edited(group, server))
        ]
        for index, changed in edits:
            self.session.edit_group(index, changed)
        if edits:
            # Only once every edit is in: the document's lrs are then the loop's own.
            self._absorb_session()

    def _fresh_names(self, count: int) -> list[str]:
        names: list[str] = []
        n = len(self.names)
        while len(names) < count:
            if f"param{n}" not in self._tensor_of:
                names.append(f"param{n}")
            n += 1
        return names

    def _grads(self) -> dict[str, np.ndarray]:
        """The gradients there are: torch leaves a tensor whose grad is None out of the step."""
        grads: dict[str, np.ndarray] = {}
        missing = []
        for name in self.names:
            tensor = self._tensor_of[name]
            if tensor.grad is None:
                missing.append(name)
            else:
                grads[name] = _to_numpy(tensor.grad, self._torch_dtype)
        if missing and not self.session.skips_missing:
            raise RuntimeError(
                f"no gradient for {missing}, and session {self.session.id} was created with "
                "missing_grads 'error', so it cannot leave them out as torch would; create "
                'it with missing_grads="skip" (RemoteOptimizer does unless given a session)'
            )
        return grads

    def _exchange(self, loss: Any) -> StepResult:
        grads = self._grads()
        result = self.session.step(
            grads,
            params=self._params() if self._send_params else None,
            loss=_loss_value(loss),
            returns="params" if self._holds else "delta",
        )
        if result.applied:
            if result.params is not None:
                self._copy_in(result.params)
            elif result.deltas is not None:
                for name, value in result.deltas.items():
                    tensor = self._tensor_of[name]
                    tensor.add_(torch.from_numpy(value).to(tensor.device, tensor.dtype))
        self._sync_lrs(result.lr)
        return result

    def _params(self) -> dict[str, np.ndarray]:
        return {n: _to_numpy(self._tensor_of[n], self._torch_dtype) for n in self.names}

    def _ask_tell_step(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            raise RuntimeError("LBFGS needs a closure that re-evaluates the model and the loss")
        self._send_group_edits()
        with torch.enable_grad():
            first_loss = closure()
        loss = first_loss
        start = self.session.step_count
        while True:
            result = self._exchange(loss)
            # The session's step advances exactly when torch's step() would return.
            if result.step != start or not result.applied:
                return first_loss
            with torch.enable_grad():
                loss = closure()


def proximal_term(
    parameters: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's ``mu/2 * ||w - w_global||^2`` summed over all tensors, differentiable in
    ``parameters``: add it to the local loss (``mu`` is ``Round.proximal_mu``).

    ``global_params`` are the round's params as received, before local training; they
    take no gradient. The norm is squared, as in the FedProx paper and Flower's docstring
    formula (Flower's code sample sums unsquared per-tensor norms).
    """
    total: torch.Tensor | None = None
    for w, g in zip(parameters, global_params, strict=True):
        term = torch.sum((w - g.detach().to(dtype=w.dtype, device=w.device)) ** 2)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("proximal_term needs at least one parameter")
    return 0.5 * mu * total


def _edited(group: Mapping[str, Any], server: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a torch group that differ from the server's, as JSON."""
    changed = {}
    for key, known in server.items():
        value = _plain(group.get(key, known))
        if value != known:
            changed[key] = value
    return changed


def _plain(value: Any) -> Any:
    """A hyperparameter as JSON has it: tuples as lists, tensors and numpy scalars as numbers."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _loss_value(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().item())
    return float(loss)


def _to_numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    value = tensor.detach()
    if value.is_sparse:
        raise TypeError("sparse gradients are not supported")
    return value.to(device="cpu", dtype=dtype).contiguous().numpy()


def _layout(
    params: Iterable[Any], param_groups: Sequence[Mapping[str, Any]] | None
) -> tuple[list[str], list[torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """Names and tensors in order, the server's ``param_groups``, and options for all.

    Several torch-style group dicts become one server group each (listing every tensor),
    so each group's options apply exactly as torch applies them: on top of the
    optimizer's. A single group's options are returned as options for the optimizer.
    """
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    dict_groups: list[dict[str, Any]] = (
        [dict(g) for g in items] if isinstance(items[0], Mapping) else [{"params": items}]
    )
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    groups: list[dict[str, Any]] = []
    for group in dict_groups:
        members = group.pop("params")
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        member_names = group.pop("param_names", None)
        group_names = []
        for i, member in enumerate(members):
            if isinstance(member, tuple):
                name, tensor = member
            else:
                name = member_names[i] if member_names else f"param{len(names)}"
                tensor = member
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(tensor)}")
            if any(tensor is t for t in tensors):
                raise ValueError("some parameters appear more than once")
            names.append(str(name))
            tensors.append(tensor)
            group_names.append(str(name))
        if isinstance(group.get("optimizer"), str):
            group["optimizer"] = {"name": group["optimizer"]}  # the server's form
        groups.append({"params": group_names, **group})
    if len(dict_groups) > 1 and param_groups:
        raise ValueError("give parameter groups either as torch-style dicts or as param_groups")
    if len(groups) == 1 and "optimizer" not in groups[0]:
        shared = {k: v for k, v in groups[0].items() if k != "params"}
        return names, tensors, [dict(g) for g in param_groups or ()], shared
    return names, tensors, groups, {}


def _session_optimizer(
    optimizer: Mapping[str, Any] | None, server_groups: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any]:
    """The session's ``optimizer``: the one given, or the first group's own when every group
    names one (then the session's steps no group of its own)."""
    if optimizer is not None:
        return optimizer
    named = [g["optimizer"] for g in server_groups if "optimizer" in g]
    if not named or len(named) != len(server_groups):
        raise TypeError(
            "RemoteOptimizer needs optimizer={'name': ...} unless every param group names its "
            "own 'optimizer'"
        )
    return {"name": named[0]["name"]}


def _server_groups(session: Session) -> list[tuple[list[str], dict[str, Any]]]:
    """The session's groups in its order: tensor names and every hyperparameter."""
    groups = session.document.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise ProtocolError(f"session {session.id} document lists no param_groups")
    # "optimizer" names the group's optimizer: torch cannot change it, nor can an edit.
    return [
        (
            [str(n) for n in g["params"]],
            {k: _number(v) for k, v in g.items() if k not in ("params", "optimizer")},
        )
        for g in groups
    ]


_NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _number(value: Any) -> Any:
    """A hyperparameter as torch takes it: the server writes a non-finite float as a string."""
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


def _shapes(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in zip(names, tensors, strict=True)}


def _initial_values(
    names: Sequence[str], tensors: Sequence[torch.Tensor], dtype: str
) -> dict[str, np.ndarray]:
    return {n: _to_numpy(t, _DTYPES[dtype]) for n, t in zip(names, tensors, strict=True)}


def _check_tensors(session: Session, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    expected = _shapes(names, tensors)
    if session.shapes != expected:
        raise ValueError(
            f"session {session.id} has tensors {session.shapes}, the optimizer has {expected}"
        )
