"""``optserve check`` and ``optserve repair``: read every session back, rebuild one.

Both run on a stopped server's data directory (they take its lock). A check reads every
file of every session (the store's ``history`` verifies the checksums) and replays what
can be replayed through the same code a server runs, so a report of "ok" means a
server would serve the session exactly as it was acknowledged.

A repair rebuilds a session as the state after exactly N steps: from an intact snapshot
at or before that point and the intact events after it. Everything it does not carry
over is moved, whole, into ``quarantine/`` in the data directory, and the idempotency keys
of every stored event it drops stay archived (a retry of one is refused, never applied
as a new step).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service.core.plan import plan_from_config
from service.sessions import checkpoint
from service.sessions.federated import state as federated_state
from service.sessions.live import LiveSession
from service.sessions.runtime import Runtime
from service.sessions.store import history
from service.sessions.store.base import Event, KeyRecord, SessionRecord, Snapshot
from service.sessions.store.disk import SESSIONS_DIR, DiskStore
from service.sessions.store.history import History


@dataclass
class Report:
    """What a check found about one session."""

    session_id: str
    tenant: str | None
    damage: str | None
    problems: list[str] = field(default_factory=list)
    """Damaged files the history does not need (the session is served all the same)."""
    last_step: int | None = None
    """The session's step after the longest history that reads back (None: none does)."""
    last_seq: int | None = None
    steps: dict[int, int] = field(default_factory=dict)
    """Event count -> step, for every state that intact data can rebuild."""

    @property
    def ok(self) -> bool:
        return self.damage is None and not self.problems

    def rebuildable(self) -> list[tuple[int, int]]:
        """The steps a repair can bring the session back to, as ranges."""
        ranges: list[tuple[int, int]] = []
        for step in sorted(set(self.steps.values())):
            if ranges and step == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], step)
            else:
                ranges.append((step, step))
        return ranges


class RepairRefused(ValueError):
    """The requested step cannot be rebuilt from intact data (the message says which can)."""


@contextmanager
def opened(root: str | os.PathLike[str]) -> Iterator[DiskStore]:
    """The data directory's store, locked (``DataDirInUse`` if a server holds it)."""
    store = DiskStore(root)
    store.open()
    try:
        yield store
    finally:
        store.close()


def check(root: str | os.PathLike[str]) -> list[Report]:
    with opened(root) as store:
        return [report(store, sid) for sid in store.session_ids()]


def report(store: DiskStore, session_id: str) -> Report:
    found = store.inspect(session_id)
    tenant = found.record.tenant if found.record is not None else None
    damage = found.damage or store.unlisted.get(session_id)
    result = Report(session_id, tenant, damage, list(found.problems))
    if session_id in store.restored:
        result.problems.append("the catalog had lost it; it was added back from its directory")
    if found.record is None:
        result.damage = result.damage or "no record of the session is readable"
        return result
    try:
        result.steps = _steps(store, found, found.record)
    except Exception as exc:  # whatever the stored bytes make replay raise
        result.damage = result.damage or f"replay failed: {exc}"
        return result
    last = found.last_seq
    if last in result.steps:
        result.last_seq, result.last_step = last, result.steps[last]
    elif result.damage is None:
        result.damage = f"event {last} cannot be replayed"
    return result


def _rebuild(record: SessionRecord, snapshot: Snapshot) -> LiveSession:
    """A session as it was at ``snapshot``, as the server rebuilds it on start."""
    plan = plan_from_config(record.config, ignore=federated_state.OUTER_KEYS)
    restored = checkpoint.restore(snapshot.arrays, snapshot.metadata, plan)
    return LiveSession(
        record,
        plan,
        restored.state,
        restored.held,
        snapshot.seq,
        snapshot.at,
        restored.federation,
    )


def _bases(store: DiskStore, found: History) -> Iterator[tuple[Snapshot, list[Event]]]:
    """Every intact snapshot that has its own events, with the intact events after it."""
    directory = store.root / SESSIONS_DIR / found.session_id
    starts = {seg.start for seg in found.segments}
    newest = max(found.snapshots, default=None)
    for seq, damage in sorted(found.snapshots.items()):
        if damage is not None or (seq not in starts and seq != newest):
            continue
        if found.base is not None and found.base.seq == seq:
            snapshot = found.base
        else:
            snapshot = history.read_snapshot(
                directory / history.snap_name(seq), found.session_id, seq
            )
        yield snapshot, found.events_after(seq)


def _steps(store: DiskStore, found: History, record: SessionRecord) -> dict[int, int]:
    """Replay from every intact snapshot: the step after each event that replays."""
    steps: dict[int, int] = {}
    for snapshot, events in _bases(store, found):
        if all(e.seq in steps for e in events) and snapshot.seq in steps:
            continue  # an older base's replay covered it
        live = _rebuild(record, snapshot)
        steps.setdefault(snapshot.seq, live.state.step)
        for event in events:
            Runtime.replay(live, event)
            steps.setdefault(event.seq, live.state.step)
    return steps


def repair(root: str | os.PathLike[str], session_id: str, to_step: int) -> tuple[Report, Path]:
    """Bring ``session_id`` back to the state after ``to_step`` steps; returns the check
    of the repaired session and where its old files were put."""
    with opened(root) as store:
        if session_id not in store.session_ids():
            raise RepairRefused(f"no session {session_id!r} in {store.root}")
        found = store.inspect(session_id)
        if found.record is None:
            raise RepairRefused(
                f"session {session_id!r} has no readable record (tenant, config): it cannot "
                "be rebuilt"
            )
        before = report(store, session_id)
        targets = [seq for seq, step in before.steps.items() if step == to_step]
        if not targets:
            can = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in before.rebuildable())
            raise RepairRefused(
                f"step {to_step} of session {session_id!r} cannot be rebuilt from intact data; "
                f"steps that can: {can or 'none'}"
            )
        # The latest state at that step (a manual schedule step may follow the step).
        target = max(targets)
        # The newest intact snapshot whose events reach the target.
        base, events = max(
            (
                (snapshot, after)
                for snapshot, after in _bases(store, found)
                if snapshot.seq == target or any(e.seq == target for e in after)
            ),
            key=lambda pair: pair[0].seq,
        )
        kept = [e for e in events if e.seq <= target]
        dropped = [e for e in found.intact_events() if e.seq <= base.seq or e.seq > target]
        archived = {k.key: k for k in [*store.archived_keys(session_id), *found.keys]}
        for event in dropped:
            if event.key is not None and event.key not in archived:
                step = before.steps.get(event.seq, event.seq)
                archived[event.key] = KeyRecord(event.key, event.fingerprint, step, event.seq)
        aside = store.rewrite(session_id, base, kept, list(archived.values()))
        return report(store, session_id), aside
