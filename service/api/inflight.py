"""The body bytes held across all requests at once, bounded by one budget.

Every request body is buffered whole before it is decoded, so a few large uploads at once
could take the process far past what a single body limit suggests. Each chunk a request
receives is taken from a shared budget and given back when the request ends (its buffer,
and what was decoded from it, are gone by then). A chunk that does not fit waits a short
while for others to finish, then the request is refused with 503 and ``Retry-After``:
a client backs off instead of the server swapping.
"""

from __future__ import annotations

import asyncio
import math

from service.api.problems import BodyTooLarge, Busy


class BodyBudget:
    """Bytes of request bodies held now, at most ``limit``; a taker waits up to ``wait`` s."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.used = 0
        self._released: asyncio.Event | None = None
        """Set (and replaced) whenever bytes are given back; made by the first waiter, so
        it belongs to the loop that waits on it."""

    async def take(self, size: int) -> None:
        """Hold ``size`` more bytes, waiting for room; :class:`Busy` if none comes in time."""
        if self.used + size <= self.limit:
            self.used += size
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while self.used + size > self.limit:
            remaining = deadline - loop.time()
            if remaining <= 0 or size > self.limit:
                raise Busy(self.limit, max(1, math.ceil(self.wait)))
            if self._released is None:
                self._released = asyncio.Event()
            released = self._released
            try:
                async with asyncio.timeout(remaining):
                    await released.wait()
            except TimeoutError:
                continue
        self.used += size

    def give(self, size: int) -> None:
        """Give back ``size`` bytes taken earlier, and wake whoever waits for room."""
        self.used -= size
        if self._released is not None:
            self._released.set()
            self._released = None


BODY_ACCOUNT = "body_account"
"""Where a request's :class:`BodyAccount` is in its ``scope["state"]``."""


class BodyAccount:
    """One request's body bytes: at most ``limit`` in all (413 past it), each held in
    ``budget`` until :meth:`close` (the request's end).

    Bytes are added as messages bring them, or all at once, before they are read, for a
    body received in place (:mod:`service.api.in_place`), whose buffer is going to hold
    them all."""

    def __init__(self, limit: int, budget: BodyBudget) -> None:
        self.limit = limit
        self.budget = budget
        self.received = 0
        self.held = 0

    async def add(self, size: int) -> None:
        self.received += size
        if self.received > self.limit:
            raise BodyTooLarge(self.limit)
        if size:
            await self.budget.take(size)
            self.held += size

    def forget(self, size: int) -> None:
        """Undo ``add(size)``: those bytes are not coming this way after all."""
        self.received -= size
        self.held -= size
        self.budget.give(size)

    def close(self) -> None:
        self.budget.give(self.held)
        self.held = 0
