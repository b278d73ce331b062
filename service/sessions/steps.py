"""Steps on the session runtime: idempotency, ``If-Match``, check, log, apply.

A step, under the session's lock:

1. idempotency (:mod:`service.sessions.window`): a key still in flight is refused
   (:class:`StepInFlight`); a key whose reply is kept is answered from it; an older key is
   refused with the step it was applied at; the same key with another body is refused;
2. ``If-Match``, then the inputs are checked: names, shapes and what the step needs
   (``LiveSession.prepare``), then core's checks of the values (``LiveSession.check``:
   finiteness, a schedule that cannot advance);
3. the event (the checked inputs) is committed: appended to the store while the update is
   computed (:meth:`Runtime.commit` on a compute thread, :meth:`Runtime.commit_on_loop`
   for small sessions), so the reply is returned only once the step is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.sessions.errors import PreconditionFailed
from service.sessions.models import StepReply, StepRequest
from service.sessions.runtime import Entry, Runtime
from service.sessions.store.base import Event
from service.sessions.window import refuse_old_key

INLINE_MAX_ELEMENTS = 1 << 14
"""Steps of sessions this small run on the event loop (a durable store's write goes to the
committer): the hand-offs to a compute thread and back would cost more than the update."""


class Steps:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def step(self, tenant: str, session_id: str, request: StepRequest) -> StepReply:
        runtime = self.runtime
        entry = await runtime.entry(tenant, session_id)
        key = request.idempotency_key
        if key is not None:
            kept = entry.window.answer(key, request.fingerprint, request.sha256_fingerprint)
            if kept is not None:
                return kept
        window = entry.window
        if key is not None:
            window.inflight.add(key)
        try:
            async with runtime.locked(tenant, session_id) as entry:
                if key is not None and entry.window is not window:
                    # Reloaded meanwhile: the reloaded window knows what the store holds.
                    kept = entry.window.answer(key, request.fingerprint, request.sha256_fingerprint)
                    if kept is not None:
                        return kept
                if request.if_match is not None and request.if_match != entry.info.step:
                    raise PreconditionFailed(request.if_match, entry.info.etag)
                reply, event_bytes = await self._commit(entry, request)
                runtime.after_event(entry, event_bytes)
                if key is not None:
                    entry.window.keep(key, request.fingerprint, reply, entry.live.seq)
                return reply
        finally:
            if key is not None:
                window.inflight.discard(key)

    async def _commit(self, entry: Entry, request: StepRequest) -> tuple[StepReply, int]:
        """Check, log and apply one step, under the session lock: on a compute thread, or
        on the event loop for a small session of a store no other process shares."""
        runtime = self.runtime
        # Keys of compacted events are the store's: none before this process's first
        # compaction, unless other processes share the store.
        archive = request.idempotency_key is not None and (
            entry.base_seq > 0 or runtime.store.shared
        )
        if runtime.store.shared or entry.live.plan.size > INLINE_MAX_ELEMENTS:
            return await runtime.run(
                lambda: runtime.commit(entry, *self._checked(entry, request, archive))
            )
        # A durable store is asked off the loop.
        if archive and runtime.store.durable:
            await runtime.run_io(lambda: self._refuse_archived_key(entry, request))
            archive = False
        elif not runtime.store.durable:
            # Yield once, so that a due snapshot of this session gets its turn (a durable
            # store's append yields anyway).
            await asyncio.sleep(0)
        return await runtime.commit_on_loop(entry, *self._checked(entry, request, archive))

    def _refuse_archived_key(self, entry: Entry, request: StepRequest) -> None:
        """Refuse a key the store archived (a blocking call): it was used long ago."""
        key = request.idempotency_key
        if key is not None:
            archived = self.runtime.store.find_key(entry.id, key)
            if archived is not None:
                refuse_old_key(archived, request.fingerprint, request.sha256_fingerprint)

    def _checked(
        self, entry: Entry, request: StepRequest, archive: bool
    ) -> tuple[Event, Callable[[], StepReply], Callable[[], None]]:
        """The step's event, the update that applies it, and the checks of its values that
        come first (``Runtime.commit``: a large event's tensors are written meanwhile, and
        it is stored only if they pass).

        ``archive``: look the key up among those the store archived (a blocking call)."""
        if archive:
            self._refuse_archived_key(entry, request)
        live = entry.live
        key = request.idempotency_key
        prepared = live.prepare(request.grads, request.params, request.loss, request.want)
        event = Event(
            seq=live.seq + 1,
            kind="step",
            at=self.runtime.now(),
            key=key,
            fingerprint=request.fingerprint,
            want=prepared.want,
            grads=prepared.grads,
            params=prepared.sent_params,
            loss=prepared.loss,
        )
        skipped: list[str | None] = []  # why the checks say to skip the step, if they do

        def check() -> None:
            skipped.append(live.check(prepared))

        return event, lambda: live.apply(prepared, skipped[0], event.seq, event.at), check
