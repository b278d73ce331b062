"""The asynchronous side of federated sessions: locking, durable logging, timers, long polls.

It is a peer of steps on the session :class:`~service.sessions.runtime.Runtime`, with the
same guarantees: an update is checked, then appended to the session's log while
it is applied, under the session's lock, and acknowledged only once durable. A round that
closes by its timeout does so on a timer, as a logged ``close`` event of its own, so that
recovery replays exactly what happened and a restart in the middle of a round loses no
accepted update.

Long polls wait on one ``asyncio.Event`` per session, replaced after each change: a
waiter checks the state and, with no ``await`` in between, picks up the event of the
current state, so no change can slip past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from service.core.errors import InvalidInput
from service.core.federated.rounds import Federation
from service.sessions.federated import session as federated
from service.sessions.federated.errors import NotFederated
from service.sessions.federated.models import RoundParams, UpdateReply, UpdateRequest

if TYPE_CHECKING:
    from service.sessions.runtime import Entry, Runtime

log = logging.getLogger("optserve.federated")

MAX_WAIT_S = 60.0
"""Longest long poll; clients poll again after an empty answer."""
RETRY_CLOSE_S = 1.0
"""When a timed close fails (the store is unavailable), it is tried again this much later."""
MAX_PAGE = 1_000


class Coordinator:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        # A federated session loaded here (at start, or taken over from a replica that is
        # gone) resumes its round timer here.
        runtime.on_load.append(self._loaded)
        self._changed: dict[str, asyncio.Event] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._closes: set[asyncio.Future[None]] = set()
        """Timed closes under way: a shutdown waits for them rather than cut them off."""
        self._closing = False

    # -- lookups -------------------------------------------------------------------------

    async def _entry(self, tenant: str, session_id: str) -> Entry:
        entry = await self._runtime.entry(tenant, session_id)
        return self._federated(entry)

    @staticmethod
    def _federated(entry: Entry) -> Entry:
        if entry.live.federation is None:
            raise NotFederated(entry.id)
        return entry

    @contextlib.asynccontextmanager
    async def _locked(self, tenant: str, session_id: str) -> AsyncIterator[Entry]:
        async with self._runtime.locked(tenant, session_id) as entry:
            yield self._federated(entry)

    @staticmethod
    def _federation(entry: Entry) -> Federation:
        federation = entry.live.federation
        assert federation is not None
        return federation

    # -- updates -------------------------------------------------------------------------

    async def submit(self, tenant: str, session_id: str, request: UpdateRequest) -> UpdateReply:
        """Accept a client's update (or answer its retry again); durable when answered."""
        runtime = self._runtime
        async with self._locked(tenant, session_id) as entry:

            def run() -> tuple[UpdateReply, int | None]:
                live = entry.live
                now = runtime.now()
                prepared = federated.prepare_update(live, request, now)
                if prepared.duplicate is not None:
                    return prepared.duplicate, None
                event = federated.update_event(prepared, live.seq + 1, now)
                return runtime.commit(
                    entry, event, lambda: federated.apply_update(live, prepared, now)
                )

            reply, written = await runtime.run(run)
            if written is not None:
                self._after_change(entry, written)
            return reply

    async def _close_due(self, session_id: str) -> None:
        """Close the session's open round if its timeout has come (a timer's work)."""
        runtime = self._runtime
        entry = runtime.loaded_entry(session_id)
        if entry is None or entry.deleted or entry.broken is not None:
            return
        async with entry.lock:
            if entry.deleted or entry.broken is not None or entry.live.federation is None:
                return

            def run() -> int | None:
                live = entry.live
                now = runtime.now()
                closing = federated.prepare_close(live, now)
                if closing is None:
                    return None
                event = federated.close_event(live, live.seq + 1, now)
                _, written = runtime.commit(
                    entry, event, lambda: federated.apply_close(live, closing, now)
                )
                return written

            try:
                written = await runtime.run(run)
            except Exception:
                log.exception("session %s: closing a round at its timeout failed", session_id)
                self._arm(entry, retry=True)
                return
            if written is not None:
                self._after_change(entry, written)
            else:
                self._arm(entry)

    def _after_change(self, entry: Entry, written: int) -> None:
        self._runtime.after_event(entry, written)
        self._notify(entry.live.record.id)
        self._arm(entry)

    # -- timers --------------------------------------------------------------------------

    def _arm(self, entry: Entry, retry: bool = False) -> None:
        """(Re)start the timer that closes the open round at its deadline, if it needs one.

        A round with fewer than ``min_clients`` updates needs none: the update that
        brings it to ``min_clients`` after the deadline closes it.
        """
        session_id = entry.live.record.id
        current = asyncio.current_task()
        old = self._timers.pop(session_id, None)
        if old is not None and old is not current:
            old.cancel()
        federation = entry.live.federation
        if self._closing or entry.deleted or federation is None or federation.round is None:
            return
        opened, spec = federation.round, federation.spec
        deadline = opened.deadline(spec)
        if deadline is None or len(opened.contributions) < spec.min_clients:
            return
        delay = RETRY_CLOSE_S if retry else max(0.0, deadline - self._runtime.now())
        self._timers[session_id] = asyncio.get_running_loop().create_task(
            self._timer(session_id, delay)
        )

    async def _timer(self, session_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        # Shielded: cancelling the timer (a delete, a shutdown) from here on leaves the
        # close to finish rather than abandon it halfway through its log append.
        closing = asyncio.ensure_future(self._close_due(session_id))
        self._closes.add(closing)
        closing.add_done_callback(self._closes.discard)
        await asyncio.shield(closing)

    def _loaded(self, entry: Entry) -> None:
        """A session just loaded: arm its round timer if it is federated."""
        if entry.live.federation is not None:
            self._arm(entry)

    def forget(self, session_id: str) -> None:
        """A deleted session: stop its timer and wake its long polls (they answer 404)."""
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        self._notify(session_id)

    async def stop(self) -> None:
        """Shutting down: stop every timer and answer every long poll now."""
        self._closing = True
        timers = list(self._timers.values())
        self._timers.clear()
        for timer in timers:
            timer.cancel()
        for timer in timers:
            with contextlib.suppress(BaseException):
                await timer
        await asyncio.gather(*self._closes, return_exceptions=True)
        for session_id in list(self._changed):
            self._notify(session_id)

    # -- reading and waiting ---------------------------------------------------------------

    def _notify(self, session_id: str) -> None:
        changed = self._changed.pop(session_id, None)
        if changed is not None:
            changed.set()

    async def round(self, tenant: str, session_id: str) -> dict[str, Any]:
        runtime = self._runtime
        async with self._locked(tenant, session_id) as entry:
            live = entry.live
            return await runtime.run(lambda: federated.round_document(live, runtime.now()))

    async def params(
        self, tenant: str, session_id: str, after: int | None, wait: float
    ) -> RoundParams | None:
        """The params to train from, once the round (or version) is past ``after``.

        Waits up to ``wait`` seconds (at most :data:`MAX_WAIT_S`); None if nothing newer
        came in that time.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(max(wait, 0.0), MAX_WAIT_S)
        while True:
            entry = await self._entry(tenant, session_id)
            if after is None or federated.position(entry.live) > after or self._closing:
                break
            remaining = give_up - loop.time()
            if remaining <= 0:
                return None
            changed = self._changed.setdefault(session_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        async with self._locked(tenant, session_id) as entry:
            live = entry.live
            return await self._runtime.run(lambda: federated.params(live))

    async def history(
        self, tenant: str, session_id: str, after: int | None, limit: int
    ) -> tuple[str, list[dict[str, Any]], int | None]:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be from 1 to {MAX_PAGE}", "limit")
        async with self._locked(tenant, session_id) as entry:
            live = entry.live
            records, cursor = await self._runtime.run(lambda: federated.history(live, after, limit))
            return self._federation(entry).spec.mode, records, cursor
