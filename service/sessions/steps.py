"""Steps on the session runtime: idempotency, ``If-Match``, check, log, apply.

A step, under the session's lock:

1. idempotency (:mod:`service.sessions.window`): a key still in flight is refused
   (:class:`StepInFlight`); a key whose reply is kept is answered from it; an older key is
   refused with the step it was applied at; the same key with another body is refused;
2. ``If-Match``, then the inputs are checked: names, shapes and what the step needs
   (``LiveSession.prepare``), then core's checks of the values (``LiveSession.check``:
   finiteness, a schedule that cannot advance);
3. the event (the checked inputs) is committed: appended to the store while the update is
   computed (:meth:`Runtime.commit`), so the reply is returned only once the step is
   durable.
"""

from __future__ import annotations

import asyncio
import functools

from service.sessions.errors import PreconditionFailed
from service.sessions.models import StepReply, StepRequest
from service.sessions.runtime import Entry, Runtime
from service.sessions.store.base import Event
from service.sessions.window import refuse_old_key

INLINE_MAX_ELEMENTS = 1 << 14
"""In-memory steps of sessions this small run on the event loop: the thread hand-off would
cost more than the update (about a third of a 1k-parameter step's CPU time)."""


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
                apply = functools.partial(self._apply, entry, request)
                if not runtime.store.durable and entry.live.plan.size <= INLINE_MAX_ELEMENTS:
                    # Yield once, so that a due snapshot of this session gets its turn.
                    await asyncio.sleep(0)
                    reply, event_bytes = apply()
                else:
                    reply, event_bytes = await runtime.run(apply)
                runtime.after_event(entry, event_bytes)
                if key is not None:
                    entry.window.keep(key, request.fingerprint, reply, entry.live.seq)
                return reply
        finally:
            if key is not None:
                window.inflight.discard(key)

    def _apply(self, entry: Entry, request: StepRequest) -> tuple[StepReply, int]:
        """On a worker thread, under the session lock: check, log and apply one step."""
        live = entry.live
        key = request.idempotency_key
        if key is not None:
            archived = self.runtime.store.find_key(live.record.id, key)
            if archived is not None:
                refuse_old_key(archived, request.fingerprint, request.sha256_fingerprint)
        prepared = live.prepare(request.grads, request.params, request.loss, request.want)
        reason = live.check(prepared)
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
        return self.runtime.commit(
            entry, event, lambda: live.apply(prepared, reason, event.seq, event.at)
        )
