"""Reading a session directory back, checking everything, changing nothing.

Both the store's recovery and ``optserve check`` start here. :func:`read` verifies every
file of a session (its record, every snapshot, every log segment, its archived keys) and
decides what can be replayed:

- the **base** is the oldest intact snapshot from which intact events run, without a
  gap, to the end of the newest segment (the oldest, so that the idempotency window's
  replies can be recomputed); a damaged snapshot is passed over for a later one;
- the session is **damaged** when no such base exists, or when any stored event, before
  the base or after it, cannot be read (its idempotency key is then unknown, and a retry
  of it must not be applied as new), or when something newer than the replayable end is
  known to have existed;
- a torn tail of the newest segment (an append cut short by a crash) is the one thing
  that may be dropped; :attr:`History.torn` says where to cut.

Damaged files that are not needed (an older snapshot bypassed for a newer one) leave the
session healthy but are listed in :attr:`History.problems`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.codec import safetensors
from service.codec.errors import MalformedBody
from service.sessions.store import checksum, logfile
from service.sessions.store.base import Event, KeyRecord, SessionRecord, Snapshot

RECORD_NAME = "record"
KEYS_NAME = "keys"
SEQ_KEY = "optserve.store.seq"
AT_KEY = "optserve.store.at"
SESSION_KEY = "optserve.store.session"
CHECKSUM_KEY = "optserve.store.checksum"
_PLACEHOLDER = "0" * 16
_CHECKSUM_FIELD = re.compile(rb'"optserve\.store\.checksum":"([0-9a-f]{16})"')


def snap_name(seq: int) -> str:
    return f"snap-{seq:020d}.safetensors"


def log_name(seq: int) -> str:
    return f"log-{seq:020d}.bin"


def seqs(directory: Path, prefix: str, suffix: str) -> list[int]:
    found = []
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(suffix):
            middle = entry[len(prefix) : -len(suffix)]
            if middle.isdigit():
                found.append(int(middle))
    return sorted(found)


class Damaged(ValueError):
    """A file that fails its checks; the message says how."""


# -- the record file -------------------------------------------------------------------


def seal(payload: dict[str, Any]) -> bytes:
    """A checksummed line: 16 hex digits of the JSON's checksum, a space, the JSON."""
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return checksum.hexdigest(text).encode() + b" " + text + b"\n"


def unseal(line: bytes) -> dict[str, Any]:
    if len(line) < 18 or line[16:17] != b" " or not line.endswith(b"\n"):
        raise Damaged("not a checksummed line")
    text = line[17:-1]
    if checksum.hexdigest(text).encode() != line[:16]:
        raise Damaged("fails its checksum")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise Damaged("not a JSON object")
    return value


def encode_record(record: SessionRecord) -> bytes:
    return seal(
        {
            "format": "optserve.record/1",
            "id": record.id,
            "tenant": record.tenant,
            "config": record.config,
            "labels": record.labels,
            "created_at": record.created_at,
        }
    )


def read_record(directory: Path, session_id: str) -> SessionRecord:
    try:
        value = unseal((directory / RECORD_NAME).read_bytes())
        record = SessionRecord(
            str(value["id"]),
            str(value["tenant"]),
            dict(value["config"]),
            {str(k): str(v) for k, v in value["labels"].items()},
            float(value["created_at"]),
        )
    except OSError as exc:
        raise Damaged(f"record file unreadable ({exc.strerror})") from None
    except (Damaged, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Damaged(f"record file damaged ({exc})") from None
    if record.id != session_id:
        raise Damaged(f"record file is of session {record.id!r}")
    return record


# -- archived keys ---------------------------------------------------------------------


def encode_keys(keys: list[KeyRecord]) -> bytes:
    return seal({"keys": [[k.key, k.fingerprint, k.step, k.seq] for k in keys]})


def read_keys(directory: Path) -> tuple[list[KeyRecord], str | None]:
    """The archived keys, and why some could not be read (a torn last line is ignored:
    the compaction it belongs to never committed, its events are still in the log)."""
    path = directory / KEYS_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"archived keys unreadable ({exc.strerror})"
    keys: list[KeyRecord] = []
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, 1):
        try:
            for key, fingerprint, step, seq in unseal(line + b"\n")["keys"]:
                keys.append(KeyRecord(str(key), str(fingerprint), int(step), int(seq)))
        except (Damaged, ValueError, KeyError, TypeError) as exc:
            return keys, f"archived keys damaged at line {number} ({exc})"
    del tail  # an unfinished line: written by a compaction that did not complete
    return keys, None


# -- snapshots -------------------------------------------------------------------------


def encode_snapshot(snapshot: Snapshot, session_id: str) -> bytes:
    """A safetensors file whose metadata carries its own checksum.

    The checksum covers the whole file with its own 16 digits written as zeros, so the
    file stays a plain safetensors checkpoint (``GET .../state`` exports the same)."""
    metadata = {
        **snapshot.metadata,
        SEQ_KEY: str(snapshot.seq),
        AT_KEY: repr(snapshot.at),
        SESSION_KEY: session_id,
        CHECKSUM_KEY: _PLACEHOLDER,
    }
    data = bytearray(safetensors.encode(snapshot.arrays, metadata))
    start, end = _checksum_span(data)
    data[start:end] = checksum.hexdigest(memoryview(data)).encode()
    return bytes(data)


def _checksum_span(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    if len(data) < 8:
        raise Damaged("shorter than a safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    header = bytes(data[8 : 8 + min(header_len, len(data) - 8)])
    found = list(_CHECKSUM_FIELD.finditer(header))
    if len(found) != 1:
        raise Damaged("has no checksum")
    return 8 + found[0].start(1), 8 + found[0].end(1)


def read_snapshot(path: Path, session_id: str, seq: int) -> Snapshot:
    """The snapshot in ``path``, verified: checksum, session, and the event count its
    name says (a snapshot swapped for another is damage, however intact)."""
    try:
        data = logfile.read_file(path)
    except OSError as exc:
        raise Damaged(f"unreadable ({exc.strerror})") from None
    start, end = _checksum_span(data.data)
    stored = bytes(data[start:end]).decode()
    copy = data.copy()
    copy[start:end] = ord("0")
    if checksum.hexdigest(copy.data) != stored:
        raise Damaged("fails its checksum")
    del copy
    try:
        arrays, metadata = safetensors.decode(data.data)
        owner = metadata.pop(SESSION_KEY)
        found_seq = int(metadata.pop(SEQ_KEY))
        at = float(metadata.pop(AT_KEY))
        metadata.pop(CHECKSUM_KEY)
    except (MalformedBody, ValueError, KeyError) as exc:
        raise Damaged(f"unreadable ({exc})") from None
    if owner != session_id:
        raise Damaged(f"is of session {owner!r}")
    if found_seq != seq:
        raise Damaged(f"holds the state after event {found_seq}, not {seq}")
    return Snapshot(seq, arrays, metadata, at)


# -- a whole session -------------------------------------------------------------------


@dataclass
class Segment:
    start: int
    scan: logfile.Scan
    size: int
    """The file's size in bytes."""


@dataclass
class History:
    """Everything read back from one session directory."""

    session_id: str
    record: SessionRecord | None
    base: Snapshot | None
    """What replay starts from (for a damaged session: the start of the longest
    readable history, or None if no snapshot is readable)."""
    events: list[Event]
    """Events after ``base``, to replay (damaged: up to the first unreadable one)."""
    earlier: list[Event]
    """Intact events before ``base``: not replayed, but their keys were acknowledged."""
    later_snapshots: list[int]
    snapshots: dict[int, str | None]
    """Every snapshot file: None if intact, else what is wrong with it."""
    segments: list[Segment]
    keys: list[KeyRecord]
    """Archived keys from the keys file."""
    damage: str | None = None
    problems: list[str] = field(default_factory=list)
    """Damaged files that the history does not need (the session is still healthy)."""
    torn: tuple[int, int] | None = None
    """(segment start, valid bytes): the newest segment's torn tail, to cut."""
    needs_segment: bool = False
    """The base is the newest snapshot and has no segment yet (a crash right after it)."""
    reachable: list[tuple[int, int]] = field(default_factory=list)
    """Ranges ``(first, last)`` of event counts that intact data can rebuild."""
    broken: dict[int, str] = field(default_factory=dict)
    """Segments (by start) that do not read back whole, and why."""

    def events_after(self, base_seq: int) -> list[Event]:
        """The intact events after the snapshot at ``base_seq``, up to the first gap."""
        return _events_from(self.segments, self.broken, base_seq)[0]

    def intact_events(self) -> list[Event]:
        """Every intact event of every segment, the ones past a damaged part included."""
        return [e for seg in self.segments for e in [*seg.scan.events, *seg.scan.beyond]]

    @property
    def last_seq(self) -> int:
        if self.base is None:
            return -1
        return self.events[-1].seq if self.events else self.base.seq


def read(directory: Path, session_id: str, record: SessionRecord | None = None) -> History:
    """Read and verify one session directory (``record``: the catalog's, if it has one)."""
    problems: list[str] = []
    damage: list[str] = []
    try:
        from_file: SessionRecord | None = read_record(directory, session_id)
    except Damaged as exc:
        from_file = None
        problems.append(str(exc))
    record = record or from_file
    if not directory.is_dir():
        return History(session_id, record, None, [], [], [], {}, [], [], "its directory is missing")
    snap_seqs = seqs(directory, "snap-", ".safetensors")
    segment_starts = seqs(directory, "log-", ".bin")
    keys, keys_damage = read_keys(directory)
    if keys_damage:
        damage.append(keys_damage)

    segments: list[Segment] = []
    for start in segment_starts:
        path = directory / log_name(start)
        try:
            data = logfile.read_file(path)
        except OSError as exc:
            unreadable = f"unreadable ({exc.strerror})"
            segments.append(Segment(start, logfile.Scan([], 0, False, unreadable), 0))
            continue
        segments.append(Segment(start, logfile.scan(data, session_id), data.size))
    newest_start = segment_starts[-1] if segment_starts else None

    # Each segment must hold events start+1, start+2, ... and end where the next begins.
    broken_segments: dict[int, str] = {}
    for i, seg in enumerate(segments):
        name = log_name(seg.start)
        why: str | None = seg.scan.damage
        if seg.scan.torn and seg.start != newest_start:
            why = "a record is cut short, and it is not the newest segment"
        expected = seg.start + 1
        for event in seg.scan.events:
            if event.seq != expected:
                why = why or f"holds event {event.seq} where {expected} belongs"
                break
            expected += 1
        if why is None and i + 1 < len(segments):
            next_start = segments[i + 1].start
            last = seg.start + len(seg.scan.events)
            if last != next_start:
                why = f"ends at event {last}, but the next segment starts after {next_start}"
        if why is not None:
            broken_segments[seg.start] = f"{name}: {why}"

    snapshots: dict[int, str | None] = {}
    head = max([*snap_seqs, *segment_starts, 0])
    for seg in segments:
        for event in [*seg.scan.events, *seg.scan.beyond]:
            head = max(head, event.seq)

    def events_from(base_seq: int) -> tuple[list[Event], str | None]:
        return _events_from(segments, broken_segments, base_seq)

    base: Snapshot | None = None
    base_events: list[Event] = []
    fallback: tuple[Snapshot, list[Event], str] | None = None
    fallback_last = -1
    reachable: list[tuple[int, int]] = []
    for seq in snap_seqs:
        has_own = seq in segment_starts or seq == snap_seqs[-1]
        try:
            snapshot = read_snapshot(directory / snap_name(seq), session_id, seq)
        except Damaged as exc:
            snapshots[seq] = f"{snap_name(seq)}: {exc}"
            continue
        snapshots[seq] = None
        if not has_own:
            continue  # a compaction cut short removed the segment after it
        events, stop = events_from(seq)
        last = events[-1].seq if events else seq
        reachable.append((seq, last))
        if stop is None and last < head:
            stop = f"history ends at event {last}, but event {head} was stored"
        if stop is None:
            if base is None:
                base, base_events = snapshot, events
            continue
        if base is None and (fallback is None or last > fallback_last):
            fallback, fallback_last = (snapshot, events, stop), last

    bad_snaps = [why for why in snapshots.values() if why is not None]
    if base is None:
        if fallback is not None:
            damage.append(fallback[2])
        elif snap_seqs:
            damage.append("no snapshot is readable: " + "; ".join(bad_snaps))
        else:
            damage.append("no snapshot is stored")
        problems.extend(bad for bad in bad_snaps if bad not in damage[-1])
        begin, events = (fallback[0], fallback[1]) if fallback else (None, [])
        later: list[int] = []
        earlier: list[Event] = []
    else:
        begin, events = base, base_events
        later = [s for s in snap_seqs if s > base.seq and snapshots.get(s) is None]
        earlier = [
            e
            for seg in segments
            if seg.start < base.seq
            for e in seg.scan.events
            if e.seq <= base.seq
        ]
        for seg_start, why in broken_segments.items():
            if seg_start < base.seq:
                damage.append(why + " (the idempotency keys of its events are unknown)")
        problems.extend(bad_snaps)

    history = History(
        session_id,
        record,
        begin,
        events,
        earlier,
        later,
        snapshots,
        segments,
        keys,
        "; ".join(damage) or None,
        problems,
        reachable=_merge(reachable),
        broken=broken_segments,
    )
    if record is None and history.damage is None:
        history.damage = "no record of the session is readable"
    if history.damage is None and base is not None:
        newest = segments[-1] if segments else None
        if newest is not None and newest.start >= base.seq and newest.scan.torn:
            history.torn = (newest.start, newest.scan.valid_bytes)
        history.needs_segment = base.seq not in segment_starts
    return history


def _events_from(
    segments: list[Segment], broken: dict[int, str], base_seq: int
) -> tuple[list[Event], str | None]:
    """The intact events after ``base_seq``, without a gap, and why they stop short of the
    end of the newest segment (None if they do not)."""
    chain = [s for s in segments if s.start >= base_seq]
    out: list[Event] = []
    if chain and chain[0].start != base_seq:
        return out, f"no log segment starts at event {base_seq}"
    for seg in chain:
        if seg.start in broken:
            good = seg.start + 1
            for event in seg.scan.events:
                if event.seq != good:
                    break
                out.append(event)
                good += 1
            return out, broken[seg.start]
        out.extend(seg.scan.events)
    return out, None


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged
