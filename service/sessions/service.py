"""The session service: what the API calls for sessions.

It composes peers on the public session :class:`~service.sessions.runtime.Runtime`
(registry, locks, commit, executors, lazy loading): steps (:mod:`service.sessions.steps`),
group changes (:mod:`service.sessions.groups`) and federated rounds
(:mod:`service.sessions.federated.coordinator`); here are the lifecycle (create, restore,
read, list, delete), manual schedule steps, params and checkpoints, tenancy and limits,
and the catalogs.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from service.core import optimizers, schedules
from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.evaluation import evaluation_point
from service.core.plan import SCHEDULE_OPTIONS, Plan, plan_from_config
from service.core.training import initial_state
from service.core.training import preview as core_preview
from service.sessions import checkpoint
from service.sessions.errors import (
    LimitExceeded,
    ParamsNotHeld,
    ParamsRequired,
    PreconditionFailed,
    SessionDamaged,
    SessionNotFound,
    StorageError,
)
from service.sessions.federated import state as federated_state
from service.sessions.federated.coordinator import Coordinator
from service.sessions.groups import AddGroupRequest, GroupEditRequest, add_event, edit_event
from service.sessions.ids import new_id
from service.sessions.live import LiveSession, initial_params
from service.sessions.models import (
    Change,
    Limits,
    SessionInfo,
    StepRecord,
    StepReply,
    StepRequest,
)
from service.sessions.runtime import Runtime
from service.sessions.steps import Steps
from service.sessions.store.base import Event, SessionRecord, Snapshot

MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_PREVIEW_STEPS = 100_000
MAX_PAGE = 1_000


def _labels(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidHyperparameter("labels", "labels must be an object of strings", raw)
    if len(raw) > MAX_LABELS:
        raise InvalidHyperparameter("labels", f"at most {MAX_LABELS} labels", len(raw))
    for key, value in raw.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_LABEL_KEY:
            raise InvalidHyperparameter(
                "labels", f"label names are 1 to {MAX_LABEL_KEY} characters", key
            )
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
            raise InvalidHyperparameter(
                f"labels.{key}", f"label values are strings of at most {MAX_LABEL_VALUE}", value
            )
    return dict(raw)


def _session_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a create body into the core config (tensor data removed) and the labels."""
    if not isinstance(config, Mapping):
        raise InvalidHyperparameter("config", "the session config must be an object", config)
    core = dict(config)
    labels = _labels(core.pop("labels", None))
    params = core.get("params")
    if isinstance(params, Mapping):
        core["params"] = {
            name: {k: v for k, v in spec.items() if k != "data"}
            if isinstance(spec, Mapping)
            else spec
            for name, spec in params.items()
        }
    return core, labels


class SessionService:
    def __init__(self, runtime: Runtime, limits: Limits) -> None:
        """The service over ``runtime`` (its store, locks, idempotency windows, snapshots,
        eviction and leases, configured there)."""
        self.runtime = runtime
        self.store = runtime.store
        self.limits = limits
        self.steps = Steps(self.runtime)
        self.federated = Coordinator(self.runtime)
        """Client updates, rounds and long polls of sessions created with ``aggregation``."""
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store; sessions load on first use, federated ones now (their timers)."""
        await self.runtime.open()
        self._started = True

    async def close(self) -> None:
        await self.federated.stop()
        await self.runtime.close()

    async def ready(self) -> bool:
        return self._started and await self.runtime.run_io(self.store.ping)

    def _check_size(self, plan: Plan, hparams: Sequence[Mapping[str, Any]] | None = None) -> None:
        """The session's tensors and elements (parameters, and state that outgrows them:
        SOAP's bases, with the groups' ``hparams`` when an edit would change them) fit
        the limits."""
        tensors, elements = len(plan.tensors), plan.elements(hparams)
        if tensors > self.limits.max_tensors_per_session:
            raise LimitExceeded("tensors per session", self.limits.max_tensors_per_session, tensors)
        if elements > self.limits.max_elements_per_session:
            raise LimitExceeded(
                "elements per session", self.limits.max_elements_per_session, elements
            )

    def _check_quota(self, tenant: str) -> None:
        count = self.runtime.per_tenant[tenant]
        if count >= self.limits.max_sessions_per_tenant:
            raise LimitExceeded(
                "sessions per tenant", self.limits.max_sessions_per_tenant, count + 1
            )

    # -- create, restore, read, delete ---------------------------------------------------

    async def create(
        self,
        tenant: str,
        config: Mapping[str, Any],
        params: Mapping[str, np.ndarray] | None,
    ) -> SessionInfo:
        core, labels = _session_config(config)
        plan = plan_from_config(core, ignore=federated_state.OUTER_KEYS)
        self._check_size(plan)
        held = None
        if params is not None:
            held = await self.runtime.run(lambda: initial_params(plan.tensors, plan.dtype, params))
        federation = federated_state.begin(
            core.get("aggregation"), plan, held is not None, self.runtime.now()
        )
        if plan.averaging is not None and federation is not None:
            raise InvalidHyperparameter(
                "averaging", "a federated session takes no averaging: its rounds are its steps"
            )
        if plan.averaging is not None and held is None:
            raise InvalidHyperparameter(
                "averaging",
                "averaging keeps an average of held params: give every tensor initial 'data'",
            )
        if plan.ask_tell and held is None:
            raise ParamsRequired(
                "LBFGS with a line search or max_iter > 1 asks for the points to evaluate, "
                "so the session must hold the parameters: give every tensor initial 'data'"
            )
        record = SessionRecord(new_id(), tenant, core, labels, self.runtime.now())
        return await self._store_new(
            tenant,
            lambda: LiveSession(
                record, plan, initial_state(plan), held, 0, record.created_at, federation
            ),
        )

    async def restore(
        self, tenant: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
    ) -> SessionInfo:
        restored = await self.runtime.run(lambda: checkpoint.restore(arrays, metadata))
        core, _ = _session_config(restored.config)
        labels = _labels(restored.labels)
        self._check_size(restored.plan)
        if restored.plan.averaging is not None and restored.held is None:
            raise InvalidHyperparameter("averaging", "averaging needs a checkpoint with params")
        if restored.plan.ask_tell and restored.held is None:
            raise ParamsRequired("an LBFGS ask/tell checkpoint must hold its parameters")
        record = SessionRecord(new_id(), tenant, core, labels, self.runtime.now())
        # A new session numbers its own events from 1: it starts its own step history (the
        # checkpoint's records are keyed by the events of the session it was taken from).
        restored.history = []
        return await self._store_new(
            tenant, lambda: LiveSession.restored(record, restored, 0, record.created_at)
        )

    def is_checkpoint(self, metadata: Mapping[str, str]) -> bool:
        return checkpoint.is_checkpoint(metadata)

    async def _store_new(self, tenant: str, build: Callable[[], LiveSession]) -> SessionInfo:
        """Store a new session's first snapshot, then register it (within the quota)."""
        self._check_quota(tenant)

        def stored() -> LiveSession:
            live = build()
            arrays, metadata = live.checkpoint()
            snapshot = Snapshot(0, arrays, metadata, live.record.created_at)
            try:
                self.store.create(live.record, snapshot)
            except OSError as exc:
                raise StorageError(f"could not store the new session: {exc}") from exc
            return live

        live = await self.runtime.run(stored)
        entry = self.runtime.register(live)
        await self.runtime.fit_budget(keep=entry)
        return entry.info

    async def get(self, tenant: str, session_id: str) -> SessionInfo:
        entry = await self.runtime.entry(tenant, session_id, damaged_ok=True)
        if entry.damaged is None and entry.broken is not None:
            raise StorageError(entry.broken)
        return entry.info

    async def list(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[SessionInfo], str | None]:
        """This tenant's sessions by id, from the store's catalog; each page's sessions are
        loaded to describe them (and evicted again as the memory budget requires; with a
        shared store, read without moving them here)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", "limit")
        ids = await self.runtime.run_io(lambda: self.store.session_ids_of(tenant, after, limit + 1))
        page, more = ids[:limit], len(ids) > limit
        infos = []
        for session_id in page:
            with contextlib.suppress(SessionNotFound):  # deleted meanwhile
                infos.append(await self.runtime.describe(tenant, session_id))
        return infos, (page[-1] if more else None)

    async def delete(self, tenant: str, session_id: str) -> None:
        entry = await self.runtime.entry(tenant, session_id, damaged_ok=True)
        if entry.damaged is not None:
            # Its files are evidence: only an operator's repair changes them.
            raise SessionDamaged(session_id, entry.damaged)
        async with entry.lock:
            if entry.deleted:
                raise SessionNotFound(session_id)
            self.runtime.forget(entry)
            self.federated.forget(session_id)
        if entry.background is not None:
            with contextlib.suppress(Exception):
                await entry.background
        try:
            await self.runtime.run_io(lambda: self.store.delete(session_id))
        except OSError as exc:
            raise StorageError(f"could not delete the session's data: {exc}") from exc

    # -- steps, schedule steps, group changes ----------------------------------------------

    async def step(self, tenant: str, session_id: str, request: StepRequest) -> StepReply:
        return await self.steps.step(tenant, session_id, request)

    async def schedule_step(
        self, tenant: str, session_id: str, metric: float | None
    ) -> SessionInfo:
        if metric is not None and (not isinstance(metric, int | float) or isinstance(metric, bool)):
            raise InvalidInput(f"metric must be a number, got {metric!r}", "metric")

        def change(live: LiveSession) -> tuple[Event, Callable[[], None]]:
            live.check_schedule(metric)
            event = Event(seq=live.seq + 1, kind="schedule", at=self.runtime.now(), metric=metric)
            return event, lambda: live.schedule(metric)

        return await self._change(tenant, session_id, None, change)

    async def edit_group(self, tenant: str, session_id: str, edit: GroupEditRequest) -> SessionInfo:
        """``param_groups[index].update(values)``: checked, logged, applied from the next step."""

        def change(live: LiveSession) -> tuple[Event, Callable[[], None]] | None:
            planned = edit_event(live, edit, self.runtime.now())
            if planned is not None:
                # An edit before the first step may give SOAP longer bases.
                info = planned[0].info
                assert info is not None, "an edit event records its change"
                groups = [dict(g) for g in live.state.groups]
                groups[info["group"]].update(info["set"])
                self._check_size(live.plan, groups)
            return planned

        return await self._change(tenant, session_id, edit.if_match, change)

    async def add_group(self, tenant: str, session_id: str, add: AddGroupRequest) -> SessionInfo:
        """``add_param_group``: new tensors in a new last group, checked, logged, applied."""

        def change(live: LiveSession) -> tuple[Event, Callable[[], None]]:
            logged, apply = add_event(live, add, self.runtime.now())
            plan = apply.planned.plan
            self._check_size(plan)
            return logged, apply

        info = await self._change(tenant, session_id, add.if_match, change)
        entry = await self.runtime.entry(tenant, session_id)
        entry.state_bytes = await self.runtime.run(entry.live.state_bytes)
        await self.runtime.fit_budget(keep=entry)
        return info

    async def _change(
        self,
        tenant: str,
        session_id: str,
        if_match: int | None,
        make: Callable[[LiveSession], tuple[Event, Callable[[], None]] | None],
    ) -> SessionInfo:
        """Under the session's lock: check the change (``make`` plans it and raises for a
        bad one, changing nothing; None: nothing to change), log it durably, apply it."""
        runtime = self.runtime
        async with runtime.locked(tenant, session_id) as entry:
            if if_match is not None and if_match != entry.info.step:
                raise PreconditionFailed(if_match, entry.info.etag)

            def run() -> tuple[None, int] | None:
                change = make(entry.live)
                return None if change is None else runtime.commit(entry, *change)

            committed = await runtime.run(run)
            if committed is not None:
                runtime.after_event(entry, committed[1])
            return entry.info

    async def changes(
        self, tenant: str, session_id: str, after: int | None, limit: int
    ) -> tuple[builtins.list[Change], int | None]:
        """The change log, oldest first, from the event after ``after``; and the cursor.

        A page may hold more than ``limit`` entries: it ends with every entry of its last
        event (the cursor is an event), so that no entry of an edit falls between pages."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", "limit")
        entry = await self.runtime.entry(tenant, session_id)
        log_ = [c for c in entry.live.changes if after is None or c.seq > after]
        end = min(limit, len(log_))
        # An edit of several fields is one event: a page ends with all of its entries.
        while 0 < end < len(log_) and log_[end].seq == log_[end - 1].seq:
            end += 1
        page = log_[:end]
        return page, (page[-1].seq if len(log_) > end else None)

    async def history(
        self, tenant: str, session_id: str, after: int | None, limit: int
    ) -> tuple[builtins.list[StepRecord], int | None]:
        """The step history, oldest first, from the event after ``after``; and the cursor
        (the ``seq`` of the page's last record, or None on the last page)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", "limit")
        entry = await self.runtime.entry(tenant, session_id)
        records = entry.live.history
        start = 0 if after is None else bisect.bisect_right([r.seq for r in records], after)
        page = records[start : start + limit]
        more = start + limit < len(records)
        return page, (page[-1].seq if more and page else None)

    # -- params and checkpoints ------------------------------------------------------------

    async def params(
        self, tenant: str, session_id: str, evaluation: bool = False, *, average: bool = False
    ) -> dict[str, np.ndarray]:
        """Copies of the held parameters; with ``evaluation``, the point to evaluate the
        model at instead (schedule-free rules' average, the parameters elsewhere); with
        ``average``, their averaged copy (``averaging``)."""
        async with self.runtime.locked(tenant, session_id) as entry:
            live = entry.live
            if live.held is None:
                raise ParamsNotHeld(session_id)
            held = live.held
            if average:
                if live.average is None:
                    raise InvalidInput(
                        "this session keeps no averaged weights: create it with 'averaging'",
                        "average",
                    )
                held = live.average.values

            def copy() -> dict[str, np.ndarray]:
                values = (
                    evaluation_point(live.plan, live.state, held)
                    if evaluation
                    else [v.copy() for v in held]
                )
                return {spec.name: v for spec, v in zip(live.plan.tensors, values, strict=True)}

            return await self.runtime.run(copy)

    async def export_state(
        self, tenant: str, session_id: str
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        async with self.runtime.locked(tenant, session_id) as entry:
            live = entry.live

            def export() -> tuple[dict[str, np.ndarray], dict[str, str]]:
                arrays, metadata = live.checkpoint()
                return {k: np.array(v, copy=True) for k, v in arrays.items()}, metadata

            return await self.runtime.run(export)

    # -- catalog and preview -------------------------------------------------------------

    def preview_document(
        self,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None,
        steps: int,
        param_groups: builtins.list[Any] | None = None,
        metrics: builtins.list[float] | None = None,
    ) -> dict[str, Any]:
        """``lr``: the lr of every group before each step, the default group first, then the
        ``param_groups`` in order (``metrics`` feeds ReduceLROnPlateau, one per step);
        ``optimizers``: the optimizer that steps each group (its own, or the session's)."""
        if (
            not isinstance(steps, int)
            or isinstance(steps, bool)
            or not 1 <= steps <= MAX_PREVIEW_STEPS
        ):
            raise InvalidHyperparameter(
                "steps", f"steps must be an integer from 1 to {MAX_PREVIEW_STEPS}", steps
            )
        names: builtins.list[str] = []
        group: Any
        for group in param_groups or []:
            listed = group.get("params") if isinstance(group, Mapping) else None
            if isinstance(listed, list):
                names.extend(n for n in listed if isinstance(n, str) and n not in names)
        # 1x1 matrices: every optimizer takes them, Muon (2-D only) included.
        tensors = {name: {"shape": [1, 1]} for name in names}
        default = "default"
        while default in tensors:
            default += "_"
        config: dict[str, Any] = {
            "optimizer": optimizer,
            "params": {default: {"shape": [1, 1]}, **tensors},
        }
        if schedule is not None:
            config["schedule"] = schedule
        if param_groups is not None:
            config["param_groups"] = param_groups
        plan = plan_from_config(config)
        return {
            "lr": core_preview(plan, steps, metrics),
            "optimizers": [g.optimizer.name for g in plan.groups],
        }

    def catalog_optimizers(self) -> builtins.list[dict[str, Any]]:
        return [o.describe() for o in optimizers.all_optimizers()]

    def catalog_schedules(self) -> builtins.list[dict[str, Any]]:
        options = [a.describe() for a in SCHEDULE_OPTIONS]
        return [{**s.describe(), "options": options} for s in schedules.all_schedules()]


__all__ = ["Limits", "SessionInfo", "SessionService", "StepReply", "StepRequest"]
