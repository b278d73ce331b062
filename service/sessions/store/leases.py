"""The leases one owner holds on a shared store's sessions, acquired and renewed on use.

A replica writes a session only under its lease (DESIGN.md §5). Before an append the
session service calls :meth:`Leases.hold` (so does the PostgreSQL store for a write made
without a lease, with an owner of its own): the first time it acquires the lease;
afterwards it renews it once a third of the lease period has passed since the last
renewal, so an active session's lease always has most of its period left when the
store's fenced append checks it. An idle session's lease may lapse; renewing it later
still succeeds if nobody took it over meanwhile (its epoch is unchanged, so nothing was
written by anyone else). If it was taken over, the renewal fails and the caller must
reload the session from the store before it writes again.

Stores owned by one process (memory, disk) are not ``shared``: nothing is done for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.sessions.store.base import Fenced, LeaseHeld, Store, process_owner

DEFAULT_TTL = 10.0


@dataclass
class _Held:
    epoch: int
    renewed: float
    """Monotonic time of the acquisition or last renewal."""


class Leases:
    def __init__(
        self,
        store: Store,
        *,
        ttl: float = DEFAULT_TTL,
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.owner = owner or process_owner()
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def hold(self, session_id: str) -> None:
        """Make sure this process holds ``session_id``'s lease, for most of a period.

        Raises :class:`LeaseHeld` if another live owner has it, :class:`Fenced` if ours
        was taken over (reload the session before trusting its memory again).
        """
        if not self.store.shared:
            return
        now = self._clock()
        with self._lock:
            held = self._held.get(session_id)
        if held is None:
            epoch = self.store.acquire(session_id, self.owner, self.ttl)
            if epoch is None:
                raise LeaseHeld(session_id, "another replica holds its lease; retry shortly")
            with self._lock:
                self._held[session_id] = _Held(epoch, now)
            return
        if now - held.renewed < self.ttl / 3:
            return
        if not self.store.renew(session_id, self.owner, held.epoch, self.ttl):
            self.forget(session_id)
            raise Fenced(session_id, "its lease was taken over by another replica")
        held.renewed = now

    def epoch(self, session_id: str) -> int | None:
        """The epoch of the lease held here on ``session_id``, if any."""
        with self._lock:
            held = self._held.get(session_id)
        return None if held is None else held.epoch

    def forget(self, session_id: str) -> None:
        """The lease is gone (fenced, or the session deleted): the next hold acquires anew."""
        with self._lock:
            self._held.pop(session_id, None)
