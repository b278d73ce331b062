"""What a session store keeps, and the interface every backend implements.

A session's durable history is

- its :class:`SessionRecord` (tenant, config, labels), written once at creation;
- a base :class:`Snapshot`: the full training state as of event ``seq`` (a checkpoint,
  exactly what ``GET .../state`` exports, plus the event count);
- the :class:`Event` log after that snapshot: every accepted step or manual schedule step,
  with the inputs needed to replay it bit for bit (gradients, sent parameters, loss,
  metric) and its idempotency key.

Recovery is "load the base snapshot, replay the events after it". Numpy is
deterministic, so the replayed state is the acknowledged state, bit for bit, and the
replies to the replayed steps (which the idempotency window must return again) are
recomputed rather than stored.

``compact`` drops the history before a newer snapshot; the idempotency keys of the
dropped events are archived with it and stay findable with :meth:`Store.find_key` (so
an old retry is refused rather than applied again). Keys of the events still in the
history are the service's to track: it sees them when it replays.

Methods are synchronous and may block on I/O: the service calls them from worker
threads. Calls for one session are serialized by the caller; calls for different
sessions may run concurrently, so backends lock what they share.

**Leases.** A store that several processes share (:attr:`Store.shared`, PostgreSQL) lets a
process write a session only under a lease: :meth:`Store.acquire` takes it (bumping its
*epoch*, the fencing token), :meth:`Store.renew` extends it, :meth:`Store.release` gives it
up. Writes of a session through a store that holds its lease are *fenced*: they commit
only while that epoch is current and unexpired by the store's own clock, and an append
only if it directly follows the stored head, so a process that lost its lease (frozen,
cut off, overtaken) can never commit. Refused writes raise :class:`Fenced`. Stores that one
process owns alone (memory, disk) grant every lease at once and never fence.

**Errors.** Besides the ``KeyError``/``ValueError`` of misuse, a store raises
:class:`StoreUnavailable` when its backing service cannot be reached (whether the write in
flight committed is then unknown: callers reload before they trust their memory),
:class:`Fenced` as above, and :class:`DamagedSession` when a session's stored history
fails its checksums or does not read back to its head.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.sessions.store.aio import DirectWrite
from service.sessions.store.policy import SnapshotPolicy

EventKind = Literal["step", "schedule", "update", "close", "edit", "add_group"]
"""``update`` and ``close`` are a federated session's client updates and round closings;
``edit`` and ``add_group`` change param groups (:mod:`service.sessions.groups`)."""


@dataclass(frozen=True)
class SessionRecord:
    """What never changes about a session after creation."""

    id: str
    tenant: str
    config: dict[str, Any]
    """The session config as created (JSON, no tensor data, no labels)."""
    labels: dict[str, str]
    created_at: float
    """Unix time."""

    def catalog_row(self) -> tuple[str, str, str, str, float]:
        """The record as a catalog's ``sessions`` row (id, tenant, config, labels,
        created_at), config and labels as JSON text: the disk and PostgreSQL catalogs'
        layout."""
        config, labels = json.dumps(self.config), json.dumps(self.labels)
        return self.id, self.tenant, config, labels, self.created_at

    @classmethod
    def from_catalog_row(cls, row: Sequence[Any]) -> SessionRecord:
        """The record a :meth:`catalog_row` was made of."""
        return cls(str(row[0]), str(row[1]), json.loads(row[2]), json.loads(row[3]), float(row[4]))


@dataclass(frozen=True)
class Snapshot:
    """The full state of a session after its first ``seq`` events."""

    seq: int
    arrays: dict[str, np.ndarray]
    metadata: dict[str, str]
    at: float
    """Unix time of the last event it contains (or of the creation)."""


@dataclass(frozen=True)
class Event:
    """One accepted state change, with everything needed to replay it."""

    seq: int
    """1 for the session's first event, then consecutive."""
    kind: EventKind
    at: float
    key: str | None = None
    fingerprint: str = ""
    want: str = "delta"
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, np.ndarray] | None = None
    loss: float | None = None
    metric: float | None = None
    info: dict[str, Any] | None = None
    """A federated event's details (client, round, ...): JSON, replayed as logged."""

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the event's tensors."""
        return sum(a.nbytes for a in [*self.grads.values(), *(self.params or {}).values()])


@dataclass(frozen=True)
class KeyRecord:
    """Where an idempotency key was used: the request's fingerprint and the step."""

    key: str
    fingerprint: str
    step: int
    seq: int


@dataclass
class StoredSession:
    """One session as the store holds it: what recovery starts from."""

    record: SessionRecord
    snapshot: Snapshot | None
    """The base state; None only for a damaged session with no readable state at all."""
    events: list[Event]
    """The events after ``snapshot.seq``, in order."""
    later_snapshots: list[int]
    """Event counts of the stored snapshots newer than ``snapshot`` (compaction targets)."""
    known_keys: list[KeyRecord] = field(default_factory=list)
    """Keys of stored events before ``snapshot`` (not replayed, still not to be applied
    again); their ``step`` is the event's number, as their replies are not recomputed."""
    damage: str | None = None
    """Why the history cannot be read back to its last acknowledged event, or None.

    A damaged session's ``snapshot`` and ``events`` are the longest history that can be
    read (to show where it stood), and nothing of it may be appended to or changed."""


class DamagedSession(Exception):
    """A session's stored history cannot be read back as it was acknowledged.

    A checksum mismatch, a missing snapshot chunk, a gap in the events: nothing is repaired
    or dropped on the store's own initiative; ``reason`` says what was found.
    """

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"session {session_id} is damaged: {reason}")
        self.session_id = session_id
        self.reason = reason


class Fenced(Exception):
    """A write was refused: this store does not hold the session's current lease.

    Nothing was written. Another process may have moved the session on, so what the
    caller holds in memory for it must be reloaded before it is trusted again.
    """

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"session {session_id}: {reason}")
        self.session_id = session_id
        self.reason = reason


class LeaseHeld(Fenced):
    """The session's lease is held, unexpired, by another owner."""


class StoreUnavailable(ConnectionError):
    """The store's backing service (a database) cannot be reached right now.

    A ``ConnectionError`` (so an ``OSError``): callers treat it as they treat a failing
    disk. Raised by a write, it leaves unknown whether that write committed.
    """


def process_owner() -> str:
    """A lease owner name unique to this process (and to this call): host, pid, random."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


@dataclass
class PreparedAppend:
    """An encoded event, to be written by one of two means."""

    write: Callable[[], int]
    """Writes it durably (blocking I/O); returns what :meth:`Store.append` returns."""
    direct: DirectWrite | None = None
    """The same write as one asynchronous request, where the store offers one."""
    ahead: Callable[[], None] | None = None
    """Where the store offers it: writes the bulk of the frame (its tensors) without
    making the event stored, so that a caller can start the write before it has decided
    to append. ``write`` then writes the rest, or ``abandon`` undoes it."""
    abandon: Callable[[], None] = lambda: None
    """Undoes what ``ahead`` wrote, for an event that is not appended after all."""


class Store(ABC):
    """Durable (or not) home of every session's history."""

    durable: bool = False
    """Whether what is stored survives the process."""
    snapshot_policy: SnapshotPolicy = SnapshotPolicy()
    """When a session's history gets a new snapshot (:mod:`.policy`)."""
    keeps_history: bool = True
    """Whether :meth:`load_session` gives a session back (so a process may drop it from
    memory and load it again later)."""
    shared: bool = False
    """Whether other processes may write the same sessions (then writes need a lease)."""

    # -- leases (see the module docstring); a store owned by one process grants them all --

    def acquire(self, session_id: str, owner: str, ttl: float) -> int | None:
        """Take the session's lease for ``ttl`` seconds; its new epoch, or None if another
        owner holds it unexpired. A free or expired lease (or ``owner``'s own) is taken by
        bumping the epoch, which fences every write made under an older one."""
        return 1

    def renew(self, session_id: str, owner: str, epoch: int, ttl: float) -> bool:
        """Extend a lease to ``ttl`` seconds from now; False if ``epoch`` is no longer the
        session's (it was taken over: what the caller holds may be stale)."""
        return True

    def release(self, session_id: str, owner: str, epoch: int) -> None:
        """Give the lease up, so another owner may take it without waiting for expiry."""
        return None

    def want(self, session_id: str, owner: str) -> None:
        """Mark a session held by another owner as wanted by ``owner`` (a handover)."""
        return None

    def wanted(self, owner: str) -> list[str]:
        """The sessions ``owner`` holds that another owner is waiting for."""
        return []

    @abstractmethod
    def open(self) -> None:
        """Prepare for use; repair what a crash left (a torn log tail, a half-made session)."""

    @abstractmethod
    def close(self) -> None:
        """Release files and connections. The store may be opened again."""

    @abstractmethod
    def ping(self) -> bool:
        """Whether the store can be read and written right now."""

    @abstractmethod
    def create(self, record: SessionRecord, snapshot: Snapshot) -> None:
        """Store a new session with its initial state; durable when this returns."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget a session, its history and its keys. Unknown ids are ignored."""

    @abstractmethod
    def records(self) -> list[SessionRecord]:
        """The catalog: every session's record, in creation order, without its history."""

    def session_ids_of(self, tenant: str, after: str | None, limit: int) -> list[str]:
        """A page of one tenant's session ids in id order, those after ``after``."""
        ids = sorted(
            r.id for r in self.records() if r.tenant == tenant and (after is None or r.id > after)
        )
        return ids[:limit]

    @abstractmethod
    def load(self) -> Iterator[StoredSession]:
        """Every stored session, in creation order, ready to be replayed."""

    @abstractmethod
    def load_session(self, session_id: str) -> StoredSession | None:
        """One stored session, as :meth:`load` would yield it; None if unknown."""

    @abstractmethod
    def append(self, session_id: str, event: Event) -> int:
        """Add an event after the last one; durable when this returns.

        Returns the bytes the event takes in the store (for the snapshot policy). The
        caller hands the event's arrays over: it never modifies them afterwards.
        """

    def prepare_append(
        self, session_id: str, event: Event, asynchronous: bool = False
    ) -> PreparedAppend:
        """:meth:`append` in two parts: this one encodes the event (CPU work, on the
        caller's thread); what it returns writes it. Appends of one session are prepared
        and written one at a time, in order. ``asynchronous``: the caller can submit a
        :class:`DirectWrite` (``aio``), so the store may offer one."""
        return PreparedAppend(lambda: self.append(session_id, event))

    @abstractmethod
    def snapshot(self, session_id: str, snapshot: Snapshot) -> Callable[[], None]:
        """Capture the state after ``snapshot.seq`` events; return what makes it durable.

        Capturing reads the arrays (they may be the live state, which changes as soon as
        this returns) and starts a new stretch of history: events appended afterwards
        follow the snapshot. The returned function writes the snapshot; it may run later,
        concurrently with appends. Until it has returned, ``load`` and ``compact`` do not
        know the snapshot, and recovery replays the events before it instead.
        """

    @abstractmethod
    def compact(self, session_id: str, base_seq: int, keys: Sequence[KeyRecord]) -> None:
        """Drop the snapshots and events older than the stored snapshot at ``base_seq``.

        Afterwards ``load`` starts from that snapshot. ``keys`` are the idempotency keys of
        the dropped events; :meth:`find_key` answers for them from then on.
        """

    @abstractmethod
    def find_key(self, session_id: str, key: str) -> KeyRecord | None:
        """Where ``key`` was used, among the keys handed to :meth:`compact`."""
