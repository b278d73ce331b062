"""The session runtime: what steps, group changes and federated rounds all build on.

- **Registry.** Sessions live in memory while they are used. A session is loaded on first
  use (its base snapshot, then its events replayed) and evicted back to its stored history
  when it has been idle for ``idle_evict_s`` or when the loaded sessions' state exceeds
  ``memory_budget`` (least recently used first), so a process serves far more sessions
  than fit in its memory. Sessions the store cannot reload (a memory store that keeps no
  history) and federated sessions (their round timers run here) stay loaded.
- **Locks.** Each session has one ``asyncio.Lock``: its changes are serialized, different
  sessions change in parallel. :meth:`Runtime.locked` hands out a session under its lock.
- **Commit.** :meth:`Runtime.commit` records an event durably and applies it to memory:
  both happen, or neither. The event is checked before it is appended (nothing stored is
  ever refused later), and a large one is written while it is applied, so the disk sync
  overlaps the numpy work.
- **Executors.** Numpy work and store I/O run on two thread pools, never on the event loop.
- **Leases.** With a store that several processes share (PostgreSQL, DESIGN.md §5) a
  session is loaded and changed only under this process's lease of it
  (:mod:`service.sessions.store.leases`): taken when the session is loaded, renewed as it
  is used, given up when it is evicted. A session another process holds is answered 503
  (its lease expires, or is given up, and a retry finds it here); a lease lost meanwhile
  fences the append (the store refuses it), and the session is dropped from memory and
  loaded again under a new lease.

A change, in any peer module, is: ``async with runtime.locked(...) as entry``, then on a
worker thread (``runtime.run``) check it against ``entry.live`` and ``runtime.commit`` it,
then ``runtime.after_event`` on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from service.core.errors import CoreError
from service.core.plan import plan_from_config
from service.core.training import initial_state
from service.sessions import checkpoint
from service.sessions.committer import Committer
from service.sessions.errors import (
    SessionDamaged,
    SessionError,
    SessionNotFound,
    StorageError,
)
from service.sessions.federated import state as federated_state
from service.sessions.federated.session import FEDERATED_EVENTS
from service.sessions.federated.session import replay as replay_federated
from service.sessions.groups import GROUP_EVENTS, replay_group_change
from service.sessions.live import STEP_HISTORY, LiveSession
from service.sessions.models import SessionInfo, StepReply
from service.sessions.store.base import (
    DamagedSession,
    Event,
    Fenced,
    KeyRecord,
    LeaseHeld,
    Snapshot,
    Store,
    StoredSession,
)
from service.sessions.store.leases import DEFAULT_TTL, Leases
from service.sessions.window import Kept, Window

log = logging.getLogger("optserve.sessions")

T = TypeVar("T")

OVERLAP_MIN_BYTES = 1 << 18
"""Events at least this large are written concurrently with the update; for smaller ones
the thread hand-off costs more than it hides."""
IDEMPOTENCY_WINDOW_BYTES = 1 << 20
"""Tensor bytes of older kept replies per session, beyond the newest (which is kept whole)."""
JANITOR_PERIOD_S = 5.0
"""How often idle sessions are looked for (and leases renewed)."""


def _run_now(fn: Callable[..., int], *args: object) -> Future[int]:
    """``fn(*args)`` run here, as a completed future (its result or its exception)."""
    try:
        result = fn(*args)
    except BaseException as exc:
        return _failed(exc)
    done: Future[int] = Future()
    done.set_result(result)
    return done


def _failed(exc: BaseException) -> Future[int]:
    done: Future[int] = Future()
    done.set_exception(exc)
    return done


@dataclass
class Entry:
    """A session in memory plus the runtime's bookkeeping around it."""

    live: LiveSession
    info: SessionInfo
    """Published after each change: what readers see while a change is running."""
    window: Window
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    base_seq: int = 0
    later_snapshots: list[int] = field(default_factory=list)
    events_since_snapshot: int = 0
    bytes_since_snapshot: int = 0
    state_bytes: int = 0
    background: asyncio.Task[None] | None = None
    deleted: bool = False
    evicted: bool = False
    """Dropped from memory: the next use loads the session again."""
    broken: str | None = None
    """Set when the store failed and the session could not be reloaded."""
    damaged: str | None = None
    """Why the stored history does not read back: nothing is applied or served."""
    last_used: float = 0.0
    """Monotonic time of the last use, for idle eviction and the LRU order."""

    @property
    def tenant(self) -> str:
        return self.live.record.tenant

    @property
    def id(self) -> str:
        return self.live.record.id


class Runtime:
    def __init__(
        self,
        store: Store,
        *,
        idempotency_window: int = 16,
        idempotency_window_bytes: int = IDEMPOTENCY_WINDOW_BYTES,
        snapshot_every: int | None = None,
        snapshot_log_ratio: float | None = None,
        workers: int = 4,
        clock: Callable[[], float] = time.time,
        memory_budget: int | None = None,
        idle_evict_s: float | None = None,
        lease_ttl: float = DEFAULT_TTL,
        step_history: int = STEP_HISTORY,
    ) -> None:
        if idempotency_window < 1:
            raise ValueError("idempotency_window must be >= 1")
        self.store = store
        self.window = idempotency_window
        self.window_bytes = idempotency_window_bytes
        policy = store.snapshot_policy
        self.snapshots = dataclasses.replace(
            policy,
            every=policy.every if snapshot_every is None else snapshot_every,
            log_ratio=policy.log_ratio if snapshot_log_ratio is None else snapshot_log_ratio,
        )
        """The store's snapshot policy, with the service's overrides."""
        self.step_history = step_history
        """Records each session's step history keeps (``GET .../steps``)."""
        self.memory_budget = memory_budget
        self.leases = Leases(store, ttl=lease_ttl)
        # A shared store's idle sessions give their leases up within a lease period, so
        # that another replica asked for them takes them over without waiting for expiry.
        self.idle_evict_s = (
            min(idle_evict_s or lease_ttl, lease_ttl) if store.shared else idle_evict_s
        )
        self.now = clock
        """Wall-clock time of events (Unix seconds)."""
        self._compute = ThreadPoolExecutor(workers, thread_name_prefix="optserve-step")
        self._io = ThreadPoolExecutor(workers, thread_name_prefix="optserve-store")
        self._committer = Committer(workers, "optserve-append")
        self._sessions: dict[str, Entry] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self.per_tenant: Counter[str] = Counter()
        """Sessions per tenant in the store's catalog."""
        self._janitor: asyncio.Task[None] | None = None
        self._federated: list[str] = []
        self.on_load: list[Callable[[Entry], None]] = []
        """Called on the event loop with each session loaded (federated rounds arm their
        timers)."""

    # -- executors -------------------------------------------------------------------------

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn`` on a compute thread (numpy work)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)

    async def run_io(self, fn: Callable[[], T]) -> T:
        """``fn`` on a store thread (blocking I/O)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> list[Entry]:
        """Open the store and read its catalog; load the sessions that must run now
        (federated ones: their round timers run in the process that holds them). Returns
        those. With a shared store each federated session is taken by one replica: the
        one that gets its lease first, now or (its owner gone) at a later sweep."""
        await self.run_io(self.store.open)
        records = await self.run_io(self.store.records)
        self.per_tenant = Counter(r.tenant for r in records)
        self._federated = [r.id for r in records if "aggregation" in r.config]
        eager = [r.id for r in records if not self.reloadable] + self._federated
        loaded = [entry for entry in [await self._try_load(sid) for sid in eager] if entry]
        if self.store.shared or self.idle_evict_s is not None or self.memory_budget is not None:
            self._janitor = asyncio.get_running_loop().create_task(self._sweep())
        log.info("opened the store", extra={"sessions": len(records), "loaded": len(loaded)})
        return loaded

    async def _try_load(self, session_id: str) -> Entry | None:
        """Load a session now if it can be (a shared store's may be held elsewhere)."""
        try:
            return await self._load(session_id)
        except StorageError:
            return None

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(BaseException):
                await self._janitor
        tasks = [e.background for e in self._sessions.values() if e.background is not None]
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        # Appends under way finish before the store closes their logs.
        self._committer.close()
        await self.run_io(self.store.close)
        self._compute.shutdown(wait=True)
        self._io.shutdown(wait=True)

    @property
    def reloadable(self) -> bool:
        """Whether an evicted session can be loaded again (the store keeps its history)."""
        return self.store.keeps_history

    # -- registry --------------------------------------------------------------------------

    def loaded(self) -> list[Entry]:
        """The sessions in memory now."""
        return list(self._sessions.values())

    def loaded_entry(self, session_id: str) -> Entry | None:
        """The session if it is in memory (no loading): for timers and other background work."""
        return self._sessions.get(session_id)

    async def entry(self, tenant: str, session_id: str, *, damaged_ok: bool = False) -> Entry:
        """The session, loaded if it is not in memory; raises for one this tenant cannot use
        (unknown, another tenant's, deleted), and unless ``damaged_ok`` for a damaged or
        broken one."""
        entry = self._sessions.get(session_id)
        if entry is not None and self.store.shared:
            entry = await self._still_ours(entry)
        if entry is None:
            entry = await self._load(session_id)
        if entry is None or entry.tenant != tenant or entry.deleted:
            raise SessionNotFound(session_id)
        entry.last_used = time.monotonic()
        if not damaged_ok:
            self.check_usable(entry)
        return entry

    async def _still_ours(self, entry: Entry) -> Entry | None:
        """The entry if this process still holds its lease (renewed when due); None, and
        dropped from memory, if another took it over (what memory holds may be behind)."""
        try:
            await self.run_io(lambda: self.leases.hold(entry.id))
        except Fenced:
            self.discard(entry)
            return None
        except OSError as exc:
            raise StorageError(f"the store is unavailable: {exc}") from exc
        return entry

    def _hold(self, session_id: str) -> None:
        """Take or renew the lease of a session before it is loaded or written (a worker
        thread); refusals become the 503 that clients retry."""
        try:
            self.leases.hold(session_id)
        except LeaseHeld as exc:
            # Ask the owner to hand it over at its next sweep (it keeps it while in use).
            with contextlib.suppress(Exception):
                self.store.want(session_id, self.leases.owner)
            raise StorageError(
                f"another replica serves session {session_id} now; retry shortly ({exc.reason})"
            ) from exc
        except Fenced as exc:
            raise StorageError(f"session {session_id} moved to another replica; retry") from exc

    async def describe(self, tenant: str, session_id: str) -> SessionInfo:
        """The session document's data, for listings: of the session in memory here, or
        with a shared store, read from the store without taking its lease (a listing on
        one replica must not move sessions to it, nor wait for the replicas that hold
        them). Raises :class:`SessionNotFound` for an unknown or another tenant's id."""
        if self.store.shared and session_id not in self._sessions:
            try:
                stored = await self.run_io(lambda: self.store.load_session(session_id))
            except DamagedSession as exc:
                raise SessionDamaged(session_id, exc.reason) from exc
            except OSError as exc:
                raise StorageError(f"could not read session {session_id}: {exc}") from exc
            if stored is None or stored.record.tenant != tenant:
                raise SessionNotFound(session_id)
            return (await self._recover_or_mark(stored)).info
        entry = await self.entry(tenant, session_id, damaged_ok=True)
        if entry.damaged is None and entry.broken is not None:
            raise StorageError(entry.broken)
        return entry.info

    @staticmethod
    def check_usable(entry: Entry) -> None:
        if entry.deleted:
            raise SessionNotFound(entry.id)
        if entry.damaged is not None:
            raise SessionDamaged(entry.id, entry.damaged)
        if entry.broken is not None:
            raise StorageError(entry.broken)

    @contextlib.asynccontextmanager
    async def locked(self, tenant: str, session_id: str) -> AsyncIterator[Entry]:
        """The session under its lock, usable; loaded again if it was evicted meanwhile."""
        while True:
            entry = await self.entry(tenant, session_id)
            async with entry.lock:
                if entry.evicted:
                    continue
                self.check_usable(entry)
                yield entry
                return

    def register(self, live: LiveSession) -> Entry:
        """A session just created (its first snapshot is stored)."""
        live.history_limit = self.step_history
        entry = Entry(live, live.info(), self._new_window())
        entry.state_bytes = live.state_bytes()
        entry.last_used = time.monotonic()
        self._sessions[live.record.id] = entry
        self.per_tenant[live.record.tenant] += 1
        return entry

    def forget(self, entry: Entry) -> None:
        """A deleted session: out of the registry and the tenant's count."""
        entry.deleted = True
        self._sessions.pop(entry.id, None)
        self._loading.pop(entry.id, None)
        self.leases.forget(entry.id)
        self.per_tenant[entry.tenant] -= 1
        if self.per_tenant[entry.tenant] <= 0:
            del self.per_tenant[entry.tenant]

    def _new_window(self) -> Window:
        return Window(self.window, self.window_bytes)

    async def _load(self, session_id: str) -> Entry | None:
        """Load a session from the store (one loader per session at a time).

        The per-session loading lock stays until the session is deleted: dropping it
        while a loader waits on it would let a second loader in beside it."""
        async with self._loading.setdefault(session_id, asyncio.Lock()):
            entry = self._sessions.get(session_id)
            if entry is not None:
                return entry
            stored = await self.run_io(lambda: self._read(session_id))
            if stored is None:
                # No such session: nothing to keep (ids that do not exist cost no memory).
                self._loading.pop(session_id, None)
                return None
            entry = await self._recover_or_mark(stored)
            entry.last_used = time.monotonic()
            self._sessions[session_id] = entry
            for callback in self.on_load:
                callback(entry)
        await self.fit_budget(keep=entry)
        return entry

    def _read(self, session_id: str) -> StoredSession | None:
        """A session's stored history, read under its lease on a shared store."""
        try:
            if self.store.shared:
                self._hold(session_id)
            return self.store.load_session(session_id)
        except KeyError:  # no such session: no lease to take
            return None
        except DamagedSession as exc:
            raise SessionDamaged(session_id, exc.reason) from exc
        except OSError as exc:
            raise StorageError(f"could not read session {session_id}: {exc}") from exc

    async def _recover_or_mark(self, stored: StoredSession) -> Entry:
        try:
            return await self.run(lambda: self.recover(stored))
        except Exception as exc:
            # What the store returned does not replay: keep the session, refuse it.
            log.exception(
                "session could not be recovered; it is marked damaged",
                extra={"session": stored.record.id},
            )
            damaged = dataclasses.replace(stored, damage=f"replay failed: {exc}")
            return await self.run(lambda: self.recover(damaged))

    # -- eviction --------------------------------------------------------------------------

    def loaded_bytes(self) -> int:
        return sum(e.state_bytes for e in self._sessions.values())

    def _evictable(self, entry: Entry) -> bool:
        return (
            self.reloadable
            and entry.live.federation is None
            and not entry.lock.locked()
            and not entry.window.inflight
            and not entry.deleted
        )

    async def fit_budget(self, keep: Entry | None = None) -> None:
        """Evict the least recently used sessions until the loaded ones fit the budget."""
        if self.memory_budget is None:
            return
        while self.loaded_bytes() > self.memory_budget:
            candidates = [
                e for e in self._sessions.values() if e is not keep and self._evictable(e)
            ]
            if not candidates:
                return
            await self.evict(min(candidates, key=lambda e: e.last_used))

    async def evict(self, entry: Entry) -> bool:
        """Drop a session from memory, snapshotting it first so that a reload is quick.

        Its stored history is complete without the snapshot (every change is durable when
        acknowledged), so a failed snapshot only makes the next load replay more."""
        if not self._evictable(entry):
            return False
        if entry.background is not None:
            with contextlib.suppress(Exception):
                await entry.background
        async with entry.lock:
            if entry.evicted or entry.deleted or entry.window.inflight:
                return False
            if entry.events_since_snapshot and entry.damaged is None and entry.broken is None:
                with contextlib.suppress(Exception):
                    await self._snapshot_locked(entry)
            entry.evicted = True
            if self._sessions.get(entry.id) is entry:
                del self._sessions[entry.id]
        await self.run_io(lambda: self._release(entry.id))
        log.debug("session evicted", extra={"session": entry.id})
        return True

    def _release(self, session_id: str) -> None:
        """Give a session's lease up (shared stores), so another replica takes it at once."""
        epoch = self.leases.epoch(session_id)
        self.leases.forget(session_id)
        if self.store.shared and epoch is not None:
            with contextlib.suppress(Exception):  # it expires by itself all the same
                self.store.release(session_id, self.leases.owner, epoch)

    async def _sweep(self) -> None:
        """Now and then: evict idle sessions, keep to the budget, and with a shared store
        renew the leases of the sessions loaded here and take federated sessions whose
        owner is gone (so that their round timers run somewhere)."""
        period = min(JANITOR_PERIOD_S, (self.idle_evict_s or JANITOR_PERIOD_S) / 4)
        if self.store.shared:
            period = min(period, self.leases.ttl / 4)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await self._sweep_once()

    async def _sweep_once(self) -> None:
        if self.idle_evict_s is not None:
            cutoff = time.monotonic() - self.idle_evict_s
            for entry in list(self._sessions.values()):
                if entry.last_used < cutoff:
                    await self.evict(entry)
        await self.fit_budget()
        if not self.store.shared:
            return
        wanted = set(await self.run_io(lambda: self.store.wanted(self.leases.owner)))
        for entry in list(self._sessions.values()):
            if entry.id in wanted and await self.evict(entry):
                continue  # handed over: another replica asked for it
            await self._still_ours(entry)
        self._federated = [
            r.id for r in await self.run_io(self.store.records) if "aggregation" in r.config
        ]
        for session_id in self._federated:
            if session_id not in self._sessions:
                await self._try_load(session_id)

    # -- commit ----------------------------------------------------------------------------

    def commit(
        self,
        entry: Entry,
        event: Event,
        apply: Callable[[], T],
        check: Callable[[], None] = lambda: None,
    ) -> tuple[T, int]:
        """Append ``event`` durably and ``apply`` it: both happen, or neither.

        On a worker thread, under the session's lock. ``check`` decides
        whether the change is made at all: it raises to refuse it, and ``apply`` cannot
        refuse it afterwards. A large event is written on a store thread meanwhile: its
        tensors while ``check`` runs, its head once ``check`` has passed, and its
        ``fdatasync`` while ``apply`` computes, so the write costs no extra time when the
        checks and the update take as long. Returns ``apply``'s result and the event's bytes.
        """
        sid = entry.id
        if self.store.shared:
            self._hold(sid)
        if self.store.durable and event.tensor_bytes >= OVERLAP_MIN_BYTES:
            verdict: Future[bool] = Future()
            pending = self._io.submit(self._append_checked, sid, event, verdict)
            try:
                check()
            except BaseException:
                verdict.set_result(False)
                with contextlib.suppress(BaseException):
                    pending.result()
                raise
            verdict.set_result(True)
        else:
            check()
            pending = _run_now(self.store.append, sid, event)
        try:
            result = apply()
        except BaseException:
            with contextlib.suppress(BaseException):
                pending.result()
            # A fault of ours mid-update: the state may be half changed and the event may
            # be durable. Rebuild the session from the store so memory and store agree.
            self.discard(entry)
            raise
        return result, self._settle(entry, event, pending)

    def _append_checked(self, session_id: str, event: Event, verdict: Future[bool]) -> int:
        """Append ``event`` if ``verdict`` says so; its tensors are written while it is
        decided, where the store can write them ahead (``PreparedAppend.ahead``)."""
        prepared = self.store.prepare_append(session_id, event)
        if prepared.ahead is not None:
            prepared.ahead()
        if not verdict.result():
            prepared.abandon()
            return 0
        return prepared.write()

    async def commit_on_loop(
        self,
        entry: Entry,
        event: Event,
        apply: Callable[[], T],
        check: Callable[[], None] = lambda: None,
    ) -> tuple[T, int]:
        """:meth:`commit` on the event loop, for small sessions of a store no other process
        shares: the event is encoded here and written by the committer (one asynchronous
        kernel request, or a writer thread) while the update runs here too.

        A small update costs less than the hand-offs to a compute thread and back, and
        less than the GIL handovers between that thread and the loop (see
        :mod:`service.sessions.committer`).
        """
        check()
        pending: asyncio.Future[int] | Future[int]
        if self.store.durable:
            try:
                prepared = self.store.prepare_append(
                    entry.id, event, asynchronous=self._committer.asynchronous
                )
                pending = self._committer.submit(prepared)
            except BaseException as exc:
                pending = _failed(exc)
        else:
            pending = _run_now(self.store.append, entry.id, event)
        try:
            result = apply()
        except BaseException:
            await self._append_over(entry, pending)
            # A fault of ours mid-update: the state may be half changed and the event may
            # be durable. Rebuild the session from the store so memory and store agree.
            self.discard(entry)
            raise
        await self._append_over(entry, pending)
        return result, self._settle(entry, event, pending)

    async def _append_over(self, entry: Entry, pending: asyncio.Future[int] | Future[int]) -> None:
        """Wait until ``pending`` is over, whatever its outcome (read by the caller)."""
        if pending.done():
            return
        assert isinstance(pending, asyncio.Future)
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The server is stopping mid-append: memory may be ahead of the store, so the
            # session is loaded afresh from the store once the append is over.
            pending.add_done_callback(lambda _: self.discard(entry))
            raise
        except BaseException:
            return

    def _settle(
        self, entry: Entry, event: Event, pending: asyncio.Future[int] | Future[int]
    ) -> int:
        """The stored event's bytes once ``pending`` (its append) succeeded, moving the
        session on to it; a failed append drops the session's memory instead."""
        sid = entry.id
        try:
            written = pending.result()
        except Fenced as exc:
            # Another replica took the session over: nothing was stored, memory is behind.
            self.leases.forget(sid)
            self.discard(entry)
            raise StorageError(f"session {sid} moved to another replica; retry") from exc
        except BaseException as exc:
            # Whether the event was stored is unknown (a lost connection may follow a
            # commit): memory is dropped, and the session is loaded from the store again.
            self.discard(entry)
            raise StorageError(
                f"the change could not be stored; it was not applied: {exc}"
            ) from exc
        entry.live.seq = event.seq
        entry.live.updated_at = event.at
        return written

    def discard(self, entry: Entry) -> None:
        """Drop what memory holds of a session that may no longer match its store; its next
        use loads it from the store again (once the store answers). A store that cannot load
        it again keeps it, rebuilt from what it holds now."""
        if self.reloadable:
            entry.evicted = True
            # Atomic under the GIL: this may run on a worker thread.
            self._sessions.pop(entry.id, None)
            return
        self.reload(entry)

    def reload(self, entry: Entry) -> None:
        """Replace a session's memory by what the store holds."""
        sid = entry.id
        try:
            stored = self.store.load_session(sid)
            if stored is None:
                raise KeyError(sid)
            fresh = self.recover(stored)
            if fresh.damaged is not None:
                entry.damaged = entry.broken = fresh.damaged
        except Exception as exc:
            log.exception("session could not be reloaded from the store", extra={"session": sid})
            entry.broken = f"session {sid} is unavailable until the server restarts ({exc})"
            return
        entry.live = fresh.live
        entry.window = fresh.window
        entry.base_seq = fresh.base_seq
        entry.later_snapshots = fresh.later_snapshots
        entry.events_since_snapshot = fresh.events_since_snapshot
        entry.bytes_since_snapshot = fresh.bytes_since_snapshot
        entry.info = fresh.info

    def after_event(self, entry: Entry, event_bytes: int) -> None:
        """On the event loop, after a commit: publish the session, maybe snapshot it."""
        entry.info = entry.live.info()
        entry.events_since_snapshot += 1
        entry.bytes_since_snapshot += event_bytes
        entry.window.trim(entry.live.seq)
        self._maybe_snapshot(entry)

    # -- snapshots and compaction ------------------------------------------------------------

    def _maybe_snapshot(self, entry: Entry) -> None:
        if entry.background is not None and not entry.background.done():
            return
        if self.snapshots.due(
            entry.events_since_snapshot, entry.bytes_since_snapshot, entry.state_bytes
        ):
            entry.background = asyncio.get_running_loop().create_task(self._snapshot(entry))

    async def _snapshot(self, entry: Entry) -> None:
        try:
            async with entry.lock:
                if entry.deleted or entry.evicted or entry.broken:
                    return
                await self._snapshot_locked(entry)
        except Exception:
            log.exception("snapshot failed; the log keeps growing", extra={"session": entry.id})

    async def _snapshot_locked(self, entry: Entry) -> None:
        sid, live = entry.id, entry.live

        def capture() -> tuple[Callable[[], None], int, int]:
            arrays, metadata = live.checkpoint()
            snapshot = Snapshot(live.seq, arrays, metadata, live.updated_at)
            size = sum(a.nbytes for a in arrays.values())
            return self.store.snapshot(sid, snapshot), live.seq, size

        write, seq, size = await self.run(capture)
        entry.events_since_snapshot = 0
        entry.bytes_since_snapshot = 0
        entry.state_bytes = size
        await self.run_io(write)
        if entry.deleted:
            return
        entry.later_snapshots.append(seq)
        await self._compact(entry)

    async def _compact(self, entry: Entry) -> None:
        """Drop history that neither recovery nor the idempotency window needs any more.

        The new base is the newest snapshot at least ``window`` events old, so that a
        restart still replays (and so can answer again) the last ``window`` replies.
        """
        horizon = entry.live.seq - self.window
        candidates = [s for s in entry.later_snapshots if s <= horizon]
        if not candidates:
            return
        base = max(candidates)
        archived = entry.window.archived(base)
        sid = entry.id
        await self.run_io(lambda: self.store.compact(sid, base, archived))
        entry.window.forget(archived)
        entry.base_seq = base
        entry.later_snapshots = [s for s in entry.later_snapshots if s > base]

    # -- recovery --------------------------------------------------------------------------

    def recover(self, stored: StoredSession) -> Entry:
        """Rebuild a session from its base snapshot and replay the events after it.

        The snapshot's config is the session's as of the snapshot (groups added before it
        are in it); the record's is the one it was created with. A damaged session is
        rebuilt as far as it reads (to show where it stood) and marked so; it is never
        appended to or served.
        """
        if stored.damage is not None:
            return self._recover_damaged(stored)
        record, snapshot = stored.record, stored.snapshot
        assert snapshot is not None
        restored = checkpoint.restore(snapshot.arrays, snapshot.metadata)
        live = LiveSession.restored(record, restored, snapshot.seq, snapshot.at)
        live.history_limit = self.step_history
        entry = Entry(live, live.info(), self._new_window(), base_seq=snapshot.seq)
        entry.later_snapshots = list(stored.later_snapshots)
        for known in stored.known_keys:
            entry.window.keys[known.key] = known
        last = stored.events[-1].seq if stored.events else snapshot.seq
        keep_from = last - self.window
        for event in stored.events:
            reply = self.replay(live, event)
            live.updated_at = event.at
            if event.key is not None and reply is not None:
                entry.window.keys[event.key] = KeyRecord(
                    event.key, event.fingerprint, reply.step, event.seq
                )
                if event.seq > keep_from:
                    entry.window.remember(event.key, Kept(event.seq, event.fingerprint, reply))
            if event.seq > max(stored.later_snapshots, default=snapshot.seq):
                entry.events_since_snapshot += 1
                entry.bytes_since_snapshot += event.tensor_bytes
        entry.info = live.info()
        entry.state_bytes = live.state_bytes()
        return entry

    def _recover_damaged(self, stored: StoredSession) -> Entry:
        record = stored.record
        damage = stored.damage or "damaged"
        snapshot = stored.snapshot
        restored = None
        if snapshot is not None:
            with contextlib.suppress(Exception):
                restored = checkpoint.restore(snapshot.arrays, snapshot.metadata)
        if snapshot is None or restored is None:
            # Nothing of its state reads back: show it as created, refuse it all the same.
            plan = plan_from_config(record.config, ignore=federated_state.OUTER_KEYS)
            live = LiveSession(record, plan, initial_state(plan), None, 0, record.created_at)
        else:
            live = LiveSession.restored(record, restored, snapshot.seq, snapshot.at)
            with contextlib.suppress(Exception):
                for event in stored.events:
                    self.replay(live, event)
                    live.updated_at = event.at
        info = dataclasses.replace(live.info(), damage=damage)
        entry = Entry(live, info, self._new_window(), damaged=damage)
        # Also "broken": whatever works on live sessions in the background leaves it alone.
        entry.broken = damage
        return entry

    @staticmethod
    def replay(live: LiveSession, event: Event) -> StepReply | None:
        """Apply a logged event again; None for anything but a step.

        Every logged event was checked before it was appended, so replaying it cannot be
        refused: if it is, the history is not what was acknowledged, and the session is
        damaged (the caller marks it so).
        """
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
            return live.apply(prepared, live.check(prepared), event.seq, event.at)
        except (CoreError, SessionError) as exc:
            raise RuntimeError(f"logged event {event.seq} is refused on replay: {exc}") from exc
        finally:
            live.seq = event.seq
