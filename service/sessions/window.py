"""The idempotency window: the replies a retry with the same ``Idempotency-Key`` gets.

Each session keeps the replies of its last ``window`` keyed events (a restart rebuilds them
by replaying those events), and remembers every key still in the store's history with the
step it was applied at; the store archives older keys (``Store.find_key``). A retry is
answered from a kept reply, or refused with the step its key was applied at.

The newest keyed reply of a session is kept whole: it is the one a client retries after a
timeout. Older ones keep their tensors only while they fit in ``window_bytes``; past it
their tensors are shed, oldest first, and a retry of one of those is refused with the step
it was applied at (:class:`IdempotencyExpired`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from service.sessions.errors import IdempotencyExpired, IdempotencyKeyReused, StepInFlight
from service.sessions.models import StepReply
from service.sessions.store.base import KeyRecord

OlderFingerprint = Callable[[], str] | None
"""The request's fingerprint as servers before XXH3 computed it (sha256), on demand."""
_SHA256_HEX = 64
"""Digits of a sha256 fingerprint (XXH3-128 has 32): tells a key's recorder apart."""


def same_request(recorded: str, fingerprint: str, older: OlderFingerprint = None) -> bool:
    """Whether a key's recorded fingerprint is this request's, by the hash it was made with."""
    if recorded == fingerprint:
        return True
    return older is not None and len(recorded) == _SHA256_HEX and recorded == older()


def reply_bytes(reply: StepReply) -> int:
    return sum(a.nbytes for a in (reply.tensors or {}).values())


@dataclass
class Kept:
    """A reply kept for idempotent retries."""

    seq: int
    fingerprint: str
    reply: StepReply
    nbytes: int = 0
    """Tensor bytes the reply still holds."""
    shed: bool = False
    """Its tensors were dropped: it can no longer be answered."""


@dataclass
class Window:
    """One session's window: kept replies, keys in flight and keys in the store's history."""

    size: int
    """How many of the newest events' replies are kept."""
    max_bytes: int
    """Tensor bytes of older kept replies, beyond the newest (which is kept whole)."""
    kept: OrderedDict[str, Kept] = field(default_factory=OrderedDict)
    inflight: set[str] = field(default_factory=set)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    """Keys of the events still in the store's history (older ones are the store's)."""

    def answer(
        self, key: str, fingerprint: str, older: OlderFingerprint = None
    ) -> StepReply | None:
        """The stored reply for a retry, or an error; None for a key not seen yet."""
        if key in self.inflight:
            raise StepInFlight(key)
        kept = self.kept.get(key)
        if kept is not None:
            if not same_request(kept.fingerprint, fingerprint, older):
                raise IdempotencyKeyReused(key)
            if kept.shed:
                raise IdempotencyExpired(key, kept.reply.step)
            return dataclasses.replace(kept.reply, replayed=True)
        record = self.keys.get(key)
        if record is not None:
            refuse_old_key(record, fingerprint, older)
        return None

    def keep(self, key: str, fingerprint: str, reply: StepReply, seq: int) -> None:
        """Record the reply of the keyed event ``seq`` (the session's newest)."""
        self.remember(key, Kept(seq, fingerprint, reply))
        self.keys[key] = KeyRecord(key, fingerprint, reply.step, seq)
        self.trim(seq)

    def remember(self, key: str, kept: Kept) -> None:
        """Add the newest reply whole; shed older ones' tensors past ``max_bytes``."""
        kept.nbytes = reply_bytes(kept.reply)
        self.kept[key] = kept
        older = list(self.kept.values())[:-1]
        held = sum(k.nbytes for k in older)
        for old in older:
            if held <= self.max_bytes:
                break
            if old.nbytes:
                held -= old.nbytes
                old.reply = dataclasses.replace(old.reply, tensors=None)
                old.nbytes = 0
                old.shed = True

    def trim(self, seq: int) -> None:
        """Drop the replies of events that left the window now that ``seq`` is the newest."""
        oldest = seq - self.size
        while self.kept:
            first = next(iter(self.kept.values()))
            if first.seq > oldest:
                break
            self.kept.popitem(last=False)

    def archived(self, base: int) -> list[KeyRecord]:
        """Keys of the events up to ``base``: the store archives them when it compacts."""
        return [r for r in self.keys.values() if r.seq <= base]

    def forget(self, records: list[KeyRecord]) -> None:
        for record in records:
            if self.keys.get(record.key) is record:
                del self.keys[record.key]


def refuse_old_key(record: KeyRecord, fingerprint: str, older: OlderFingerprint = None) -> None:
    """A key used before, out of the window: refused, saying when it was applied."""
    if not same_request(record.fingerprint, fingerprint, older):
        raise IdempotencyKeyReused(record.key)
    raise IdempotencyExpired(record.key, record.step)
