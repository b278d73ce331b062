"""The session service: lifecycle, step semantics, idempotency, durability, tenancy, limits.

What the API calls. Every session lives in memory (:class:`LiveSession`); the store keeps
its history (a base snapshot plus the events after it) so that a restart replays every
session to exactly its last acknowledged step.

A step, under the session's lock:

1. idempotency: a key still in flight is refused (:class:`StepInFlight`); a key whose
   reply is kept is answered from it; an older key is refused with the step it was
   applied at; the same key with another body is refused;
2. ``If-Match``, then the inputs are checked (names, shapes, finiteness, params needed);
3. the event (the checked inputs) is appended to the store *while* the update is
   computed, on another thread: the append's ``fdatasync`` overlaps the numpy work;
4. the reply is returned only once both are done, so a 2xx means the step is durable.

Numpy work and store I/O run on thread pools, never on the event loop. Different
sessions step in parallel; one session's steps are serialized.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service.core import optimizers, schedules
from service.core.errors import CoreError, InvalidHyperparameter, InvalidInput
from service.core.plan import SCHEDULE_OPTIONS, plan_from_config
from service.core.training import initial_state
from service.core.training import preview as core_preview
from service.sessions import checkpoint
from service.sessions.errors import (
    IdempotencyExpired,
    IdempotencyKeyReused,
    LimitExceeded,
    ParamsNotHeld,
    ParamsRequired,
    PreconditionFailed,
    SessionError,
    SessionNotFound,
    StepInFlight,
    StorageError,
)
from service.sessions.federated import state as federated_state
from service.sessions.federated.coordinator import Coordinator
from service.sessions.federated.session import FEDERATED_EVENTS
from service.sessions.federated.session import replay as replay_federated
from service.sessions.groups import (
    GROUP_EVENTS,
    AddGroupRequest,
    GroupEditRequest,
    add_event,
    edit_event,
    replay_group_change,
)
from service.sessions.ids import new_id
from service.sessions.live import LiveSession, initial_params
from service.sessions.models import Change, Limits, SessionInfo, StepReply, StepRequest
from service.sessions.store.base import (
    Event,
    Fenced,
    KeyRecord,
    SessionRecord,
    Snapshot,
    Store,
    StoredSession,
)
from service.sessions.store.leases import DEFAULT_TTL, Leases

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_PREVIEW_STEPS = 100_000
MAX_PAGE = 1_000
SNAPSHOT_LOG_RATIO = 16.0
"""Snapshot once the events since the last snapshot take this many times the state's size.

A snapshot costs about the state's size in writes and each step about a gradient's, so
snapshots add ``1 / ratio`` to the steps' write cost, and a replay after a crash reads at
most ``ratio`` state-sizes of log."""
SNAPSHOT_MIN_LOG_BYTES = 1 << 20
"""...but never for less than this much log: replaying it is trivial, and tiny sessions
(whose events take a whole disk block each) would otherwise snapshot every few steps."""
OVERLAP_MIN_BYTES = 1 << 18
"""Events at least this large are written concurrently with the update; for smaller ones
the thread hand-off costs more than it hides."""
INLINE_MAX_ELEMENTS = 1 << 14
"""In-memory steps of sessions this small run on the event loop: the thread hand-off would
cost more than the update (about a third of a 1k-parameter step's CPU time)."""


def _event_size(event: Event) -> int:
    return sum(a.nbytes for a in [*event.grads.values(), *(event.params or {}).values()])


@dataclass
class _Kept:
    """A reply kept for idempotent retries."""

    seq: int
    fingerprint: str
    reply: StepReply


@dataclass
class _Entry:
    """A session plus the service's bookkeeping around it."""

    live: LiveSession
    info: SessionInfo
    """Published after each change: what readers see while a step is running."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: set[str] = field(default_factory=set)
    window: OrderedDict[str, _Kept] = field(default_factory=OrderedDict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    """Keys of the events still in the store's history (older ones are the store's)."""
    base_seq: int = 0
    later_snapshots: list[int] = field(default_factory=list)
    events_since_snapshot: int = 0
    bytes_since_snapshot: int = 0
    state_bytes: int = 0
    background: asyncio.Task[None] | None = None
    deleted: bool = False
    broken: str | None = None
    """Set when the store failed and the session could not be reloaded."""
    heal: asyncio.Task[None] | None = None
    """A reload retried because the store was unreachable (``broken`` until it succeeds)."""
    heal_wanted: bool = False
    """Whether ``broken`` is the store's unavailability, to be retried, not a lasting fault."""

    @property
    def tenant(self) -> str:
        return self.live.record.tenant


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
    def __init__(
        self,
        store: Store,
        limits: Limits,
        *,
        idempotency_window: int = 16,
        snapshot_every: int = 1000,
        snapshot_log_ratio: float = SNAPSHOT_LOG_RATIO,
        workers: int = 4,
        clock: Callable[[], float] = time.time,
        lease_ttl: float = DEFAULT_TTL,
    ) -> None:
        if idempotency_window < 1:
            raise ValueError("idempotency_window must be >= 1")
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self.store = store
        self.limits = limits
        self.window = idempotency_window
        self.snapshot_every = snapshot_every
        self.snapshot_log_ratio = snapshot_log_ratio
        self._clock = clock
        # A shared store (PostgreSQL) is written only under this process's leases.
        self.leases = Leases(store, ttl=lease_ttl)
        self._compute = ThreadPoolExecutor(workers, thread_name_prefix="optserve-step")
        self._io = ThreadPoolExecutor(workers, thread_name_prefix="optserve-store")
        self._sessions: dict[str, _Entry] = {}
        self._per_tenant: Counter[str] = Counter()
        self._started = False
        self.federated = Coordinator(self)
        """Client updates, rounds and long polls of sessions created with ``aggregation``."""

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)

    async def _run_io(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    def _entry(self, tenant: str, session_id: str) -> _Entry:
        entry = self._sessions.get(session_id)
        if entry is None or entry.tenant != tenant or entry.deleted:
            raise SessionNotFound(session_id)
        if entry.broken is not None:
            if entry.heal_wanted and (entry.heal is None or entry.heal.done()):
                # The store was unreachable when the session had to be reloaded: try
                # again now, in the background; this request is answered 503.
                entry.heal = asyncio.get_running_loop().create_task(self._heal(entry))
            raise StorageError(entry.broken)
        return entry

    async def _heal(self, entry: _Entry) -> None:
        async with entry.lock:
            await self._run(lambda: self._reload(entry))

    def _reserve(self, tenant: str) -> None:
        count = self._per_tenant[tenant]
        if count >= self.limits.max_sessions_per_tenant:
            raise LimitExceeded(
                "sessions per tenant", self.limits.max_sessions_per_tenant, count + 1
            )
        self._per_tenant[tenant] += 1

    def _release(self, tenant: str) -> None:
        self._per_tenant[tenant] -= 1
        if self._per_tenant[tenant] <= 0:
            del self._per_tenant[tenant]

    def _check_size(self, tensors: int, elements: int) -> None:
        if tensors > self.limits.max_tensors_per_session:
            raise LimitExceeded("tensors per session", self.limits.max_tensors_per_session, tensors)
        if elements > self.limits.max_elements_per_session:
            raise LimitExceeded(
                "elements per session", self.limits.max_elements_per_session, elements
            )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and replay every stored session to its last acknowledged step."""
        await self._run_io(self.store.open)
        # One session at a time: a store's history can be large, so never hold it all.
        stored = iter(self.store.load())
        while (item := await self._run_io(lambda: next(stored, None))) is not None:
            try:
                entry = await self._run(functools.partial(self._recover, item))
            except Exception:
                log.exception("session %s could not be recovered; skipping it", item.record.id)
                continue
            self._sessions[item.record.id] = entry
            self._per_tenant[entry.tenant] += 1
        self._started = True
        self.federated.resume()
        log.info("recovered %d sessions", len(self._sessions))

    async def close(self) -> None:
        await self.federated.stop()
        tasks = [
            task
            for e in self._sessions.values()
            for task in (e.background, e.heal)  # snapshots, and reloads being retried
            if task is not None
        ]
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        await self._run_io(self.store.close)
        self._compute.shutdown(wait=True)
        self._io.shutdown(wait=True)

    async def ready(self) -> bool:
        return self._started and await self._run_io(self.store.ping)

    # -- create, restore, read, delete ---------------------------------------------------

    async def create(
        self,
        tenant: str,
        config: Mapping[str, Any],
        params: Mapping[str, np.ndarray] | None,
    ) -> SessionInfo:
        core, labels = _session_config(config)
        plan = plan_from_config(core, ignore=federated_state.OUTER_KEYS)
        self._check_size(len(plan.tensors), plan.size)
        held = None
        if params is not None:
            held = await self._run(lambda: initial_params(plan.tensors, plan.dtype, params))
        federation = federated_state.begin(
            core.get("aggregation"), plan, held is not None, self._clock()
        )
        if plan.ask_tell and held is None:
            raise ParamsRequired(
                "LBFGS with a line search or max_iter > 1 asks for the points to evaluate, "
                "so the session must hold the parameters: give every tensor initial 'data'"
            )
        self._reserve(tenant)
        try:
            record = SessionRecord(new_id(), tenant, core, labels, self._clock())

            def build() -> LiveSession:
                live = LiveSession(
                    record, plan, initial_state(plan), held, 0, record.created_at, federation
                )
                self._store_new(live)
                return live

            live = await self._run(build)
        except BaseException:
            self._release(tenant)
            raise
        return self._register(live)

    async def restore(
        self, tenant: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
    ) -> SessionInfo:
        restored = await self._run(lambda: checkpoint.restore(arrays, metadata))
        core, _ = _session_config(restored.config)
        labels = _labels(restored.labels)
        self._check_size(len(restored.plan.tensors), restored.plan.size)
        if restored.plan.ask_tell and restored.held is None:
            raise ParamsRequired("an LBFGS ask/tell checkpoint must hold its parameters")
        self._reserve(tenant)
        try:
            record = SessionRecord(new_id(), tenant, core, labels, self._clock())

            def build() -> LiveSession:
                live = LiveSession(
                    record,
                    restored.plan,
                    restored.state,
                    restored.held,
                    0,
                    record.created_at,
                    restored.federation,
                    core,
                    restored.changes,
                )
                self._store_new(live)
                return live

            live = await self._run(build)
        except BaseException:
            self._release(tenant)
            raise
        return self._register(live)

    def is_checkpoint(self, metadata: Mapping[str, str]) -> bool:
        return checkpoint.is_checkpoint(metadata)

    def _store_new(self, live: LiveSession) -> None:
        arrays, metadata = live.checkpoint()
        snapshot = Snapshot(0, arrays, metadata, live.record.created_at)
        try:
            self.store.create(live.record, snapshot)
        except OSError as exc:
            raise StorageError(f"could not store the new session: {exc}") from exc

    def _register(self, live: LiveSession) -> SessionInfo:
        entry = _Entry(live, live.info())
        entry.state_bytes = live.state_bytes()
        self._sessions[live.record.id] = entry
        return entry.info

    async def get(self, tenant: str, session_id: str) -> SessionInfo:
        return self._entry(tenant, session_id).info

    async def list(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[SessionInfo], str | None]:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", "limit")
        ids = sorted(
            sid for sid, e in self._sessions.items() if e.tenant == tenant and not e.deleted
        )
        if after is not None:
            ids = [sid for sid in ids if sid > after]
        page = ids[:limit]
        cursor = page[-1] if len(ids) > limit else None
        return [self._sessions[sid].info for sid in page], cursor

    async def delete(self, tenant: str, session_id: str) -> None:
        entry = self._entry_even_broken(tenant, session_id)
        async with entry.lock:
            if entry.deleted:
                raise SessionNotFound(session_id)
            entry.deleted = True
            self._sessions.pop(session_id, None)
            self._release(tenant)
            self.federated.forget(session_id)
            self.leases.forget(session_id)
        if entry.background is not None:
            with contextlib.suppress(Exception):
                await entry.background
        try:
            await self._run_io(lambda: self.store.delete(session_id))
        except OSError as exc:
            raise StorageError(f"could not delete the session's data: {exc}") from exc

    def _entry_even_broken(self, tenant: str, session_id: str) -> _Entry:
        entry = self._sessions.get(session_id)
        if entry is None or entry.tenant != tenant or entry.deleted:
            raise SessionNotFound(session_id)
        return entry

    # -- steps ---------------------------------------------------------------------------

    async def step(self, tenant: str, session_id: str, request: StepRequest) -> StepReply:
        entry = self._entry(tenant, session_id)
        key = request.idempotency_key
        if key is not None:
            kept = self._kept_reply(entry, key, request.fingerprint)
            if kept is not None:
                return kept
            entry.inflight.add(key)
        try:
            async with entry.lock:
                entry = self._entry(tenant, session_id)
                if request.if_match is not None and request.if_match != entry.info.step:
                    raise PreconditionFailed(request.if_match, entry.info.etag)
                apply = functools.partial(self._apply_step, entry, request)
                if not self.store.durable and entry.live.plan.size <= INLINE_MAX_ELEMENTS:
                    # Yield once, so that a due snapshot of this session gets its turn.
                    await asyncio.sleep(0)
                    reply, event_bytes = apply()
                else:
                    reply, event_bytes = await self._run(apply)
                self._after_event(entry, event_bytes)
                if key is not None:
                    self._keep(entry, key, request.fingerprint, reply)
                return reply
        finally:
            if key is not None:
                entry.inflight.discard(key)

    def _kept_reply(self, entry: _Entry, key: str, fingerprint: str) -> StepReply | None:
        """The stored reply for a retry, or an error; None for a key not seen yet."""
        if key in entry.inflight:
            raise StepInFlight(key)
        kept = entry.window.get(key)
        if kept is not None:
            if kept.fingerprint != fingerprint:
                raise IdempotencyKeyReused(key)
            return dataclasses.replace(kept.reply, replayed=True)
        record = entry.keys.get(key)
        if record is not None:
            self._refuse_old_key(record, fingerprint)
        return None

    @staticmethod
    def _refuse_old_key(record: KeyRecord, fingerprint: str) -> None:
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused(record.key)
        raise IdempotencyExpired(record.key, record.step)

    def _apply_step(self, entry: _Entry, request: StepRequest) -> tuple[StepReply, int]:
        """On a worker thread, under the session lock: check, log and apply one step."""
        live = entry.live
        key = request.idempotency_key
        if key is not None:
            archived = self.store.find_key(live.record.id, key)
            if archived is not None:
                self._refuse_old_key(archived, request.fingerprint)
        prepared = live.prepare(request.grads, request.params, request.loss, request.want)
        event = Event(
            seq=live.seq + 1,
            kind="step",
            at=self._clock(),
            key=key,
            fingerprint=request.fingerprint,
            want=prepared.want,
            grads=prepared.grads,
            params=prepared.sent_params,
            loss=prepared.loss,
        )
        return self._commit(entry, event, lambda: live.apply(prepared))

    def _commit(self, entry: _Entry, event: Event, apply: Callable[[], T]) -> tuple[T, int]:
        """Append ``event`` durably and ``apply`` it: both happen, or neither.

        A large event is written on a store thread while ``apply`` computes, so the
        ``fdatasync`` costs no extra time when the update takes as long. Core checks the
        values before changing anything; if it refuses them, the event is taken back.
        """
        live = entry.live
        sid = live.record.id
        pending: Future[int] = Future()
        if self.store.durable and _event_size(event) >= OVERLAP_MIN_BYTES:
            pending = self._io.submit(self._append, sid, event)
        else:
            try:
                pending.set_result(self._append(sid, event))
            except BaseException as exc:
                pending.set_exception(exc)
        try:
            result = apply()
        except (CoreError, SessionError) as refused:
            # Nothing changed in memory; take the event back from the store.
            try:
                pending.result()
            except BaseException:
                raise refused from None
            try:
                self.store.retract(sid, event.seq)
            except BaseException:
                # It stays in the log; replay refuses it the same way and skips it.
                log.exception("session %s: could not retract event %d", sid, event.seq)
                live.seq = event.seq
            raise
        except BaseException:
            # A fault of ours mid-update: the state may be half changed and the event may
            # be durable. Rebuild the session from the store so memory and disk agree.
            with contextlib.suppress(BaseException):
                pending.result()
            self._reload(entry)
            raise
        try:
            written = pending.result()
        except BaseException as exc:
            self._reload(entry)
            raise StorageError(f"the step could not be stored; it was not applied: {exc}") from exc
        live.seq = event.seq
        live.updated_at = event.at
        return result, written

    def _append(self, sid: str, event: Event) -> int:
        """The store's append, under this process's lease of the session (shared stores)."""
        try:
            self.leases.hold(sid)
            return self.store.append(sid, event)
        except Fenced:
            # Another replica has the session now; the caller reloads it from the store.
            self.leases.forget(sid)
            raise

    def _reload(self, entry: _Entry) -> None:
        """Replace a session's memory by what the store holds (after a failed append)."""
        sid = entry.live.record.id
        try:
            stored = self.store.load_session(sid)
            if stored is None:
                raise KeyError(sid)
            fresh = self._recover(stored)
        except ConnectionError as exc:
            # The store is unreachable (a database down): retried on the next request.
            log.warning("session %s could not be reloaded from the store: %s", sid, exc)
            entry.broken = f"session {sid} is unavailable while the store is unreachable"
            entry.heal_wanted = True
            return
        except Exception as exc:
            log.exception("session %s could not be reloaded from the store", sid)
            entry.broken = f"session {sid} is unavailable until the server restarts ({exc})"
            entry.heal_wanted = False
            return
        entry.live = fresh.live
        entry.window = fresh.window
        entry.keys = fresh.keys
        entry.base_seq = fresh.base_seq
        entry.later_snapshots = fresh.later_snapshots
        entry.events_since_snapshot = fresh.events_since_snapshot
        entry.bytes_since_snapshot = fresh.bytes_since_snapshot
        entry.info = fresh.live.info()
        entry.broken = None
        entry.heal_wanted = False

    def _after_event(self, entry: _Entry, event_bytes: int) -> None:
        entry.info = entry.live.info()
        entry.events_since_snapshot += 1
        entry.bytes_since_snapshot += event_bytes
        self._maybe_snapshot(entry)

    def _keep(self, entry: _Entry, key: str, fingerprint: str, reply: StepReply) -> None:
        seq = entry.live.seq
        entry.window[key] = _Kept(seq, fingerprint, reply)
        entry.keys[key] = KeyRecord(key, fingerprint, reply.step, seq)
        self._trim_window(entry)

    def _trim_window(self, entry: _Entry) -> None:
        oldest = entry.live.seq - self.window
        while entry.window:
            first = next(iter(entry.window.values()))
            if first.seq > oldest:
                break
            entry.window.popitem(last=False)

    # -- manual schedule, params, state --------------------------------------------------

    async def schedule_step(
        self, tenant: str, session_id: str, metric: float | None
    ) -> SessionInfo:
        if metric is not None and (not isinstance(metric, int | float) or isinstance(metric, bool)):
            raise InvalidInput(f"metric must be a number, got {metric!r}", "metric")
        entry = self._entry(tenant, session_id)
        async with entry.lock:
            entry = self._entry(tenant, session_id)

            def run() -> tuple[None, int]:
                live = entry.live
                # schedule() checks before it changes anything, so only an accepted
                # schedule step is logged; a failed append reloads the session.
                live.schedule(metric)
                event = Event(seq=live.seq + 1, kind="schedule", at=self._clock(), metric=metric)
                return self._commit(entry, event, lambda: None)

            _, written = await self._run(run)
            self._after_event(entry, written)
            self._trim_window(entry)
            return entry.info

    async def edit_group(self, tenant: str, session_id: str, edit: GroupEditRequest) -> SessionInfo:
        """``param_groups[index].update(values)``: checked, logged, applied from the next step."""
        return await self._change_groups(
            tenant, session_id, edit.if_match, lambda live: edit_event(live, edit, self._clock())
        )

    async def add_group(self, tenant: str, session_id: str, add: AddGroupRequest) -> SessionInfo:
        """``add_param_group``: new tensors in a new last group, checked, logged, applied."""

        def event(live: LiveSession) -> tuple[Event, Callable[[], None]]:
            logged, apply = add_event(live, add, self._clock())
            plan = apply.planned.plan
            self._check_size(len(plan.tensors), plan.size)
            return logged, apply

        info = await self._change_groups(tenant, session_id, add.if_match, event)
        entry = self._entry(tenant, session_id)
        entry.state_bytes = await self._run(entry.live.state_bytes)
        return info

    async def _change_groups(
        self,
        tenant: str,
        session_id: str,
        if_match: int | None,
        make: Callable[[LiveSession], tuple[Event, Callable[[], None]]],
    ) -> SessionInfo:
        """Under the session's lock: check the change (``make`` plans it and raises for a
        bad one, changing nothing), log it durably, then apply it."""
        entry = self._entry(tenant, session_id)
        async with entry.lock:
            entry = self._entry(tenant, session_id)
            if if_match is not None and if_match != entry.info.step:
                raise PreconditionFailed(if_match, entry.info.etag)

            def run() -> tuple[None, int]:
                event, apply = make(entry.live)
                return self._commit(entry, event, apply)

            _, written = await self._run(run)
            self._after_event(entry, written)
            self._trim_window(entry)
            return entry.info

    async def changes(
        self, tenant: str, session_id: str, after: int | None, limit: int
    ) -> tuple[builtins.list[Change], int | None]:
        """The change log, oldest first, from the event after ``after``; and the cursor."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", "limit")
        entry = self._entry(tenant, session_id)
        log_ = [c for c in entry.live.changes if after is None or c.seq > after]
        page = log_[:limit]
        return page, (page[-1].seq if len(log_) > limit else None)

    async def params(self, tenant: str, session_id: str) -> dict[str, np.ndarray]:
        entry = self._entry(tenant, session_id)
        if entry.live.held is None:
            raise ParamsNotHeld(session_id)
        async with entry.lock:
            entry = self._entry(tenant, session_id)
            live = entry.live

            def copy() -> dict[str, np.ndarray]:
                assert live.held is not None
                return {
                    spec.name: values.copy()
                    for spec, values in zip(live.plan.tensors, live.held, strict=True)
                }

            return await self._run(copy)

    async def export_state(
        self, tenant: str, session_id: str
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        entry = self._entry(tenant, session_id)
        async with entry.lock:
            entry = self._entry(tenant, session_id)
            live = entry.live

            def export() -> tuple[dict[str, np.ndarray], dict[str, str]]:
                arrays, metadata = live.checkpoint()
                return {k: np.array(v, copy=True) for k, v in arrays.items()}, metadata

            return await self._run(export)

    # -- snapshots and compaction ----------------------------------------------------------

    def _maybe_snapshot(self, entry: _Entry) -> None:
        if entry.background is not None and not entry.background.done():
            return
        log_limit = max(self.snapshot_log_ratio * entry.state_bytes, SNAPSHOT_MIN_LOG_BYTES)
        due = (
            entry.events_since_snapshot >= self.snapshot_every
            or entry.bytes_since_snapshot >= log_limit
        )
        if due:
            entry.background = asyncio.get_running_loop().create_task(self._snapshot(entry))

    async def _snapshot(self, entry: _Entry) -> None:
        sid = entry.live.record.id
        try:
            async with entry.lock:
                if entry.deleted or entry.broken:
                    return
                live = entry.live

                def capture() -> tuple[Callable[[], None], int, int]:
                    arrays, metadata = live.checkpoint()
                    snapshot = Snapshot(live.seq, arrays, metadata, live.updated_at)
                    size = sum(a.nbytes for a in arrays.values())
                    return self.store.snapshot(sid, snapshot), live.seq, size

                write, seq, size = await self._run(capture)
                entry.events_since_snapshot = 0
                entry.bytes_since_snapshot = 0
                entry.state_bytes = size
            await self._run_io(write)
            if entry.deleted:
                return
            entry.later_snapshots.append(seq)
            await self._compact(entry)
        except Exception:
            log.exception("snapshot of session %s failed; its log keeps growing", sid)

    async def _compact(self, entry: _Entry) -> None:
        """Drop history that neither recovery nor the idempotency window needs any more.

        The new base is the newest snapshot at least ``window`` events old, so that a
        restart still replays (and so can answer again) the last ``window`` replies.
        """
        horizon = entry.live.seq - self.window
        candidates = [s for s in entry.later_snapshots if s <= horizon]
        if not candidates:
            return
        base = max(candidates)
        archived = [r for r in entry.keys.values() if r.seq <= base]
        sid = entry.live.record.id
        await self._run_io(lambda: self.store.compact(sid, base, archived))
        for record in archived:
            if entry.keys.get(record.key) is record:
                del entry.keys[record.key]
        entry.base_seq = base
        entry.later_snapshots = [s for s in entry.later_snapshots if s > base]

    # -- recovery ------------------------------------------------------------------------

    def _recover(self, stored: StoredSession) -> _Entry:
        """Rebuild a session from its base snapshot and replay the events after it.

        The snapshot's config is the session's as of the snapshot (groups added before it
        are in it); the record's is the one it was created with.
        """
        record, snapshot = stored.record, stored.snapshot
        restored = checkpoint.restore(snapshot.arrays, snapshot.metadata)
        live = LiveSession(
            record,
            restored.plan,
            restored.state,
            restored.held,
            snapshot.seq,
            snapshot.at,
            restored.federation,
            restored.config,
            restored.changes,
        )
        entry = _Entry(live, live.info(), base_seq=snapshot.seq)
        entry.later_snapshots = list(stored.later_snapshots)
        last = stored.events[-1].seq if stored.events else snapshot.seq
        keep_from = last - self.window
        for event in stored.events:
            reply = self._replay(live, event)
            live.updated_at = event.at
            if event.key is not None and reply is not None:
                entry.keys[event.key] = KeyRecord(
                    event.key, event.fingerprint, reply.step, event.seq
                )
                if event.seq > keep_from:
                    entry.window[event.key] = _Kept(event.seq, event.fingerprint, reply)
            if event.seq > max(stored.later_snapshots, default=snapshot.seq):
                entry.events_since_snapshot += 1
                entry.bytes_since_snapshot += _event_size(event)
        entry.info = live.info()
        entry.state_bytes = live.state_bytes()
        return entry

    @staticmethod
    def _replay(live: LiveSession, event: Event) -> StepReply | None:
        """Apply a logged event again; None for anything but a step, or a refused event."""
        try:
            if event.kind in FEDERATED_EVENTS:
                replay_federated(live, event)
                return None
            if event.kind == "schedule":
                live.schedule(event.metric)
                return None
            if event.kind in GROUP_EVENTS:
                replay_group_change(live, event)
                return None
            prepared = live.prepare(event.grads, event.params, event.loss, event.want)
            return live.apply(prepared)
        except (CoreError, SessionError) as exc:
            # Refused before it changed anything, as it was when it was logged (a crash
            # came between its append and its retraction): it is a no-op.
            log.warning(
                "session %s: event %d is refused again (%s)", live.record.id, event.seq, exc
            )
            return None
        finally:
            live.seq = event.seq

    # -- catalog and preview -------------------------------------------------------------

    def preview(
        self,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None,
        steps: int,
        param_groups: builtins.list[Any] | None = None,
        metrics: builtins.list[float] | None = None,
    ) -> builtins.list[builtins.list[float]]:
        """The lr of every group before each step: the default group first, then the
        ``param_groups`` in order. ``metrics`` feeds ReduceLROnPlateau, one per step."""
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
        tensors = {name: {"shape": [1]} for name in names}
        default = "default"
        while default in tensors:
            default += "_"
        config: dict[str, Any] = {
            "optimizer": optimizer,
            "params": {default: {"shape": [1]}, **tensors},
        }
        if schedule is not None:
            config["schedule"] = schedule
        if param_groups is not None:
            config["param_groups"] = param_groups
        plan = plan_from_config(config)
        return core_preview(plan, steps, metrics)

    def catalog_optimizers(self) -> builtins.list[dict[str, Any]]:
        return [o.describe() for o in optimizers.all_optimizers()]

    def catalog_schedules(self) -> builtins.list[dict[str, Any]]:
        options = [a.describe() for a in SCHEDULE_OPTIONS]
        return [{**s.describe(), "options": options} for s in schedules.all_schedules()]


__all__ = ["Limits", "SessionInfo", "SessionService", "StepReply", "StepRequest"]
