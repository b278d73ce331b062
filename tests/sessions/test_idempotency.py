"""Idempotency keys: replay, reuse with another body, expiry, in-flight retries; and the
serialization of one session's steps while other sessions go on."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
import tracemalloc
from typing import Any

import numpy as np
import pytest

from service.sessions.errors import IdempotencyExpired, IdempotencyKeyReused, StepInFlight
from service.sessions.models import StepReply, StepRequest
from service.sessions.store import Event, MemoryStore
from service.sessions.store.base import KeyRecord
from service.sessions.window import Window, refuse_old_key
from tests.sessions.conftest import StoreFactory, grads_for, running, settle

pytestmark = pytest.mark.anyio

SHAPES = {"w": (5,)}
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9},
    "params": {"w": {"shape": [5]}},
}


def request(
    seed: int, key: str | None = None, shapes: dict[str, tuple[int, ...]] = SHAPES, **kw: Any
) -> StepRequest:
    return StepRequest(
        grads=grads_for(shapes, seed), idempotency_key=key, fingerprint=f"body-{seed}", **kw
    )


async def test_a_retry_gets_the_stored_reply_and_applies_nothing() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIG, {"w": np.zeros(5)})).id
        first = await service.step("t", sid, request(1, "k1"))
        again = await service.step("t", sid, request(1, "k1"))
        assert again.replayed and not first.replayed
        assert (again.step, again.lr, again.applied) == (first.step, first.lr, first.applied)
        assert first.tensors is not None and again.tensors is not None
        np.testing.assert_array_equal(again.tensors["w"], first.tensors["w"])
        assert (await service.get("t", sid)).step == 1
        np.testing.assert_array_equal((await service.params("t", sid))["w"], first.tensors["w"])


async def test_a_retry_is_answered_even_if_the_session_moved_on() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIG, None)).id
        first = await service.step("t", sid, request(1, "k1", if_match=0))
        await service.step("t", sid, request(2, "k2"))
        again = await service.step("t", sid, request(1, "k1", if_match=0))
        assert again.replayed and again.step == first.step == 1


async def test_the_same_key_with_another_body_is_refused() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIG, None)).id
        await service.step("t", sid, request(1, "k1"))
        with pytest.raises(IdempotencyKeyReused):
            await service.step("t", sid, request(2, "k1"))
        assert (await service.get("t", sid)).step == 1


async def test_keys_are_per_session() -> None:
    async with running(MemoryStore()) as service:
        a = (await service.create("t", CONFIG, None)).id
        b = (await service.create("t", CONFIG, None)).id
        await service.step("t", a, request(1, "k"))
        reply = await service.step("t", b, request(1, "k"))
        assert not reply.replayed and reply.step == 1


async def test_a_failed_request_does_not_use_up_its_key() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIG, None)).id
        bad = StepRequest(grads={"w": np.zeros(4)}, idempotency_key="k", fingerprint="x")
        with pytest.raises(Exception, match="shape"):
            await service.step("t", sid, bad)
        reply = await service.step("t", sid, request(1, "k"))
        assert reply.applied and not reply.replayed


@pytest.mark.parametrize("size", [5, 1 << 15], ids=["on the loop", "on a compute thread"])
async def test_an_old_key_is_refused_with_the_step_it_was_applied_at(
    store_factory: StoreFactory, size: int
) -> None:
    # A small window and frequent snapshots: old keys leave the window, then the history.
    # Sessions past INLINE_MAX_ELEMENTS step on a compute thread, which asks the store too.
    options = {"idempotency_window": 2, "snapshot_every": 2}
    config = {**CONFIG, "params": {"w": {"shape": [size]}}}
    sized = functools.partial(request, shapes={"w": (size,)})

    async with running(store_factory(), **options) as service:
        sid = (await service.create("t", config, None)).id
        for i in range(1, 10):
            await service.step("t", sid, sized(i, f"k{i}"))
        await settle(service)
        with pytest.raises(IdempotencyExpired) as expired:
            await service.step("t", sid, sized(1, "k1"))
        assert expired.value.step == 1
        with pytest.raises(IdempotencyExpired) as recent:
            await service.step("t", sid, sized(6, "k6"))
        assert recent.value.step == 6
        with pytest.raises(IdempotencyKeyReused):
            await service.step("t", sid, sized(99, "k1"))
        assert (await service.step("t", sid, sized(9, "k9"))).replayed
        assert (await service.get("t", sid)).step == 9
    store = store_factory()
    store.open()
    stored = store.load_session(sid)
    store.close()
    assert stored is not None and stored.snapshot.seq >= 1  # k1 was archived by compaction
    # After a restart, the same answers: keys come back from the log and the archive.
    async with running(store_factory(), **options) as service:
        with pytest.raises(IdempotencyExpired) as expired:
            await service.step("t", sid, sized(1, "k1"))
        assert expired.value.step == 1
        with pytest.raises(IdempotencyExpired):
            await service.step("t", sid, sized(7, "k7"))
        assert (await service.step("t", sid, sized(9, "k9"))).replayed
        assert (await service.step("t", sid, sized(10, "k10"))).step == 10


class GatedStore(MemoryStore):
    """Appends wait for a gate, on the store's threads, like a slow disk."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def append(self, session_id: str, event: Event) -> int:
        self.waiting.set()
        assert self.gate.wait(10)
        return super().append(session_id, event)


async def wait_for(flag: threading.Event) -> None:
    for _ in range(1000):
        if flag.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def test_a_retry_while_the_first_is_in_flight_is_refused() -> None:
    store = GatedStore()
    store.gate.set()
    async with running(store) as service:
        slow = (await service.create("t", CONFIG, None)).id
        other = (await service.create("t", CONFIG, None)).id
        store.gate.clear()
        first = asyncio.ensure_future(service.step("t", slow, request(1, "k1")))
        await wait_for(store.waiting)
        with pytest.raises(StepInFlight):
            await service.step("t", slow, request(1, "k1"))
        # Another step of the same session waits its turn...
        second = asyncio.ensure_future(service.step("t", slow, request(2, "k2")))
        await asyncio.sleep(0.05)
        assert not second.done()
        store.gate.set()
        assert (await first).step == 1
        assert (await second).step == 2
        # ...and the finished key replays.
        assert (await service.step("t", slow, request(1, "k1"))).replayed
        assert (await service.step("t", other, request(1, "k1"))).step == 1


async def test_other_sessions_step_while_one_is_blocked() -> None:
    store = GatedStore()
    store.gate.set()
    async with running(store) as service:
        slow = (await service.create("t", CONFIG, None)).id
        fast = (await service.create("t", CONFIG, None)).id
        store.gate.clear()
        blocked = asyncio.ensure_future(service.step("t", slow, request(1)))
        await wait_for(store.waiting)
        # The event loop is free: reads answer while the step is in progress.
        assert (await service.get("t", slow)).step == 0
        store.gate.set()
        assert (await service.step("t", fast, request(1))).step == 1
        assert (await blocked).step == 1


async def test_concurrent_steps_of_one_session_are_serialized() -> None:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIG, {"w": np.zeros(5)})).id
        replies = await asyncio.gather(
            *(service.step("t", sid, request(i, f"k{i}")) for i in range(20))
        )
        assert sorted(r.step for r in replies) == list(range(1, 21))
        assert (await service.get("t", sid)).step == 20


async def test_only_the_newest_reply_keeps_its_tensors_past_the_window_bytes(
    store_factory: StoreFactory,
) -> None:
    options = {"idempotency_window": 8, "idempotency_window_bytes": 0}
    async with running(store_factory(), **options) as service:
        sid = (await service.create("t", CONFIG, {"w": np.zeros(5)})).id
        quiet = await service.step("t", sid, request(1, "k1", want="none"))
        await service.step("t", sid, request(2, "k2"))
        newest = await service.step("t", sid, request(3, "k3"))
        retried = await service.step("t", sid, request(3, "k3"))
        assert retried.replayed and retried.step == newest.step == 3
        assert newest.tensors is not None and retried.tensors is not None
        np.testing.assert_array_equal(retried.tensors["w"], newest.tensors["w"])
        # An older reply that carried tensors is refused with its step; one without
        # tensors costs nothing to keep and is still answered.
        with pytest.raises(IdempotencyExpired) as shed:
            await service.step("t", sid, request(2, "k2"))
        assert shed.value.step == 2
        with pytest.raises(IdempotencyKeyReused):
            await service.step("t", sid, request(99, "k2"))
        assert (await service.step("t", sid, request(1, "k1", want="none"))).step == quiet.step
        assert (await service.get("t", sid)).step == 3
    # A restart rebuilds the window the same way: the newest answer, exactly.
    async with running(store_factory(), **options) as service:
        again = await service.step("t", sid, request(3, "k3"))
        assert again.replayed and again.tensors is not None
        np.testing.assert_array_equal(again.tensors["w"], newest.tensors["w"])
        with pytest.raises(IdempotencyExpired):
            await service.step("t", sid, request(2, "k2"))


async def test_older_replies_within_the_window_bytes_are_answered_whole() -> None:
    async with running(MemoryStore(), idempotency_window_bytes=1 << 20) as service:
        sid = (await service.create("t", CONFIG, {"w": np.zeros(5)})).id
        first = await service.step("t", sid, request(1, "k1"))
        await service.step("t", sid, request(2, "k2"))
        again = await service.step("t", sid, request(1, "k1"))
        assert again.replayed and again.tensors is not None and first.tensors is not None
        np.testing.assert_array_equal(again.tensors["w"], first.tensors["w"])


async def test_the_window_of_a_large_session_holds_one_reply_not_sixteen() -> None:
    size = 10_000_000
    config = {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [size]}}}
    grads = {"w": np.full(size, 0.5, np.float32)}
    tracemalloc.start()
    try:
        async with running(MemoryStore(keep_history=False), idempotency_window=16) as service:
            empty = tracemalloc.get_traced_memory()[0]
            sid = (await service.create("t", config, {"w": np.zeros(size, np.float32)})).id
            # One step first, so that every state tensor exists.
            await service.step("t", sid, StepRequest(grads=grads))
            state = tracemalloc.get_traced_memory()[0] - empty
            for i in range(20):
                step = StepRequest(grads=grads, idempotency_key=f"k{i}", fingerprint=f"b{i}")
                await service.step("t", sid, step)
            held = tracemalloc.get_traced_memory()[0] - empty
            assert (await service.step("t", sid, step)).replayed
    finally:
        tracemalloc.stop()
    assert state >= 3 * 4 * size  # params, exp_avg, exp_avg_sq
    assert held < 1.5 * state, f"{held / state:.2f}x the session's state"


def test_a_key_recorded_with_a_sha256_fingerprint_is_still_recognised() -> None:
    """Servers before XXH3 recorded sha256 fingerprints: a retry of such a key across the
    upgrade replays (or is refused as expired), not refused as a reused key."""
    older = hashlib.sha256(b"the request").hexdigest()
    reply = StepReply(step=3, lr=[0.1], applied=True, evaluate=False, tensors=None)
    window = Window(size=4, max_bytes=1 << 20)
    window.keep("k", older, reply, seq=3)
    asked: list[bool] = []

    def sha256_of_request() -> str:
        asked.append(True)
        return older

    replay = window.answer("k", "x" * 32, sha256_of_request)
    assert replay is not None and replay.replayed and replay.step == 3 and asked
    with pytest.raises(IdempotencyKeyReused):
        window.answer("k", "x" * 32, lambda: hashlib.sha256(b"another").hexdigest())
    with pytest.raises(IdempotencyKeyReused):
        window.answer("k", "x" * 32)  # without the older hash: not the same request
    with pytest.raises(IdempotencyExpired):
        refuse_old_key(KeyRecord("k", older, 3, 3), "x" * 32, sha256_of_request)
