"""Recovery: a restarted service replays every session to exactly its last acknowledged
step, bit for bit, with its idempotency window; a torn log tail loses only the step that
was never acknowledged; a failed append applies nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.errors import CoreError
from service.sessions.errors import IdempotencyExpired, SessionDamaged, StorageError
from service.sessions.models import StepRequest
from service.sessions.service import SessionService
from service.sessions.store import DiskStore, Event, MemoryStore, logfile
from service.sessions.store.disk import SESSIONS_DIR
from tests.sessions.conftest import StoreFactory, grads_for, running, settle
from tests.sessions.reference import core_params

pytestmark = pytest.mark.anyio

SHAPES = {"w": (6, 4), "b": (4,)}
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "AdamW", "lr": 0.05, "amsgrad": True},
    "schedule": {"name": "CosineAnnealingLR", "T_max": 7},
    "params": {name: {"shape": list(shape)} for name, shape in SHAPES.items()},
    "param_groups": [{"params": ["b"], "weight_decay": 0.0, "lr": 0.02}],
    "clip_grad_norm": {"max_norm": 1.0},
    "dtype": "float64",
}
START = grads_for(SHAPES, seed=1234, dtype=np.float64)


def step_grads(i: int) -> dict[str, np.ndarray]:
    return grads_for(SHAPES, seed=i, dtype=np.float64)


def key_request(i: int, want: str = "delta") -> StepRequest:
    return StepRequest(grads=step_grads(i), idempotency_key=f"k{i}", fingerprint=f"f{i}", want=want)


async def exported(service: SessionService, sid: str) -> tuple[dict[str, bytes], dict[str, str]]:
    arrays, metadata = await service.export_state("t", sid)
    return {k: v.tobytes() for k, v in arrays.items()}, metadata


@pytest.mark.parametrize("snapshot_every", [1, 3, 1000])
async def test_restarts_replay_to_the_exact_state(
    store_factory: StoreFactory, snapshot_every: int
) -> None:
    options = {"snapshot_every": snapshot_every, "idempotency_window": 3}
    async with running(MemoryStore()) as steady:
        ref = (await steady.create("t", CONFIG, START)).id
        sid = None
        step = 0
        last: Any = None
        last_reply: Any = None
        for restart in range(5):
            async with running(store_factory(), **options) as service:
                if sid is None:
                    sid = (await service.create("t", CONFIG, START)).id
                else:
                    # The state after a restart is the state before it, bit for bit...
                    assert await exported(service, sid) == last
                    # ...and the last replies are still there.
                    again = await service.step("t", sid, key_request(step))
                    assert again.replayed and again.tensors is not None
                    assert all(
                        np.array_equal(again.tensors[k], last_reply.tensors[k]) for k in SHAPES
                    )
                for _ in range(restart + 2):
                    step += 1
                    last_reply = await service.step("t", sid, key_request(step))
                    assert last_reply.tensors is not None
                    await steady.step("t", ref, key_request(step))
                await settle(service)
                last = await exported(service, sid)
        async with running(store_factory(), **options) as service:
            assert await exported(service, sid) == last
            held = await service.params("t", sid)
        steady_arrays, _ = await exported(steady, ref)
    assert {k: v for k, v in last[0].items()} == steady_arrays
    want = core_params(CONFIG, START, [step_grads(i) for i in range(1, step + 1)])
    for name in SHAPES:
        np.testing.assert_array_equal(held[name], want[name])


async def test_every_session_and_tenant_is_recovered(store_factory: StoreFactory) -> None:
    async with running(store_factory()) as service:
        a = await service.create("ta", CONFIG, START)
        b = await service.create("tb", {**CONFIG, "labels": {"x": "y"}}, None)
        await service.step("ta", a.id, key_request(1))
        await service.step("tb", b.id, StepRequest(grads=step_grads(1), params=START))
        before = [
            (await service.get("ta", a.id)).document(),
            (await service.get("tb", b.id)).document(),
        ]
    async with running(store_factory()) as service:
        after = [
            (await service.get("ta", a.id)).document(),
            (await service.get("tb", b.id)).document(),
        ]
        assert after == before
        listed, _ = await service.list("tb", 10, None)
        assert [s.id for s in listed] == [b.id]


async def test_manual_schedule_steps_survive_a_restart(store_factory: StoreFactory) -> None:
    cfg = {
        **CONFIG,
        "schedule": {"name": "StepLR", "step_size": 1, "gamma": 0.5, "interval": "manual"},
    }
    async with running(store_factory()) as service:
        sid = (await service.create("t", cfg, START)).id
        await service.step("t", sid, StepRequest(grads=step_grads(1)))
        await service.schedule_step("t", sid, None)
        await service.schedule_step("t", sid, None)
        await service.step("t", sid, StepRequest(grads=step_grads(2)))
        before = await exported(service, sid)
        lr = (await service.get("t", sid)).lr
    async with running(store_factory()) as service:
        assert await exported(service, sid) == before
        assert (await service.get("t", sid)).lr == lr == [0.05 * 0.25, 0.02 * 0.25]


def log_files(root: Path, sid: str) -> list[Path]:
    return sorted((root / SESSIONS_DIR / sid).glob("log-*.bin"))


async def test_a_crash_mid_record_loses_only_the_unacknowledged_step(tmp_path: Path) -> None:
    root = tmp_path / "data"
    async with running(DiskStore(root)) as service:
        sid = (await service.create("t", CONFIG, START)).id
        for i in range(1, 5):
            await service.step("t", sid, key_request(i))
        # Where the frames end (zeros written ahead follow them while the log is open).
        size_before_last = logfile.scan(logfile.read_file(log_files(root, sid)[-1])).valid_bytes
        await service.step("t", sid, key_request(5))
    # The last record was being written when the process died: cut it in the middle.
    last_log = log_files(root, sid)[-1]
    os.truncate(last_log, size_before_last + 100)  # mid-header of the last frame
    async with running(DiskStore(root)) as service:
        assert (await service.get("t", sid)).step == 4
        want = core_params(CONFIG, START, [step_grads(i) for i in range(1, 5)])
        held = await service.params("t", sid)
        assert all(np.array_equal(held[k], want[k]) for k in SHAPES)
        # The client never got an answer, so it retries: the step is applied once.
        retry = await service.step("t", sid, key_request(5))
        assert not retry.replayed and retry.step == 5
        assert (await service.step("t", sid, key_request(5))).replayed


class FlakyStore(MemoryStore):
    """Fails appends on demand, like a full or broken disk."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def append(self, session_id: str, event: Event) -> int:
        if self.fail:
            raise OSError(28, "No space left on device")
        return super().append(session_id, event)


async def test_a_failed_append_applies_nothing() -> None:
    store = FlakyStore()
    async with running(store) as service:
        sid = (await service.create("t", CONFIG, START)).id
        await service.step("t", sid, key_request(1))
        before = await exported(service, sid)
        store.fail = True
        with pytest.raises(StorageError):
            await service.step("t", sid, key_request(2))
        assert await exported(service, sid) == before
        assert (await service.get("t", sid)).step == 1
        store.fail = False
        reply = await service.step("t", sid, key_request(2))
        assert reply.step == 2 and not reply.replayed
    want = core_params(CONFIG, START, [step_grads(1), step_grads(2)])
    async with running(store) as service:
        held = await service.params("t", sid)
    assert all(np.array_equal(held[k], want[k]) for k in SHAPES)


async def test_a_refused_step_leaves_nothing_in_the_log(store_factory: StoreFactory) -> None:
    cfg = {**CONFIG, "schedule": {"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 2}}
    async with running(store_factory()) as service:
        sid = (await service.create("t", cfg, START)).id
        bad = step_grads(1)
        bad["w"][0, 0] = np.inf
        with pytest.raises(CoreError):
            await service.step(
                "t", sid, StepRequest(grads=bad, idempotency_key="x", fingerprint="1")
            )
        await service.step("t", sid, key_request(1))
        await service.step("t", sid, key_request(2))
        # OneCycleLR cannot go past total_steps: core refuses, after the event was logged.
        with pytest.raises(CoreError):
            await service.step("t", sid, key_request(3))
        before = await exported(service, sid)
    store = store_factory()
    store.open()
    stored = store.load_session(sid)
    store.close()
    assert stored is not None and [e.key for e in stored.events] == ["k1", "k2"]
    async with running(store_factory()) as service:
        assert await exported(service, sid) == before
        with pytest.raises(CoreError):  # refused again, not answered from a stored reply
            await service.step("t", sid, key_request(3))


async def test_a_damaged_log_is_listed_and_refused_not_served(tmp_path: Path) -> None:
    root = tmp_path / "data"
    async with running(DiskStore(root)) as service:
        sid = (await service.create("t", CONFIG, START)).id
        for i in range(1, 6):
            await service.step("t", sid, key_request(i))
    path = log_files(root, sid)[-1]
    raw = bytearray(path.read_bytes())
    raw[4096 + 300] ^= 0x01  # event 2 of 5: intact events follow it
    path.write_bytes(bytes(raw))
    async with running(DiskStore(root)) as service:
        info = await service.get("t", sid)
        assert info.damage is not None and info.document()["health"] == "damaged"
        assert info.step == 1  # as far as it reads back
        [listed], _ = await service.list("t", 10, None)
        assert listed.damage == info.damage
        for call in (
            service.step("t", sid, key_request(5)),
            service.step("t", sid, key_request(6)),
            service.params("t", sid),
            service.export_state("t", sid),
            service.schedule_step("t", sid, None),
            service.delete("t", sid),
        ):
            with pytest.raises(SessionDamaged):
                await call
    assert path.read_bytes() == bytes(raw)


async def test_a_damaged_base_snapshot_falls_back_and_keeps_the_older_keys(tmp_path: Path) -> None:
    root = tmp_path / "data"
    async with running(DiskStore(root), snapshot_every=3, idempotency_window=2) as service:
        sid = (await service.create("t", CONFIG, START)).id
        for i in range(1, 8):
            await service.step("t", sid, key_request(i))
            await settle(service)
    snaps = sorted((root / SESSIONS_DIR / sid).glob("snap-*"))
    assert len(snaps) >= 2
    raw = bytearray(snaps[0].read_bytes())
    raw[-3] ^= 0x01
    snaps[0].write_bytes(bytes(raw))
    async with running(DiskStore(root), snapshot_every=3, idempotency_window=2) as service:
        info = await service.get("t", sid)
        assert info.damage is None and info.step == 7
        want = core_params(CONFIG, START, [step_grads(i) for i in range(1, 8)])
        held = await service.params("t", sid)
        assert all(np.array_equal(held[k], want[k]) for k in SHAPES)
        # Step 4 sits before the new base: not replayed, but never applied again.
        with pytest.raises(IdempotencyExpired):
            await service.step("t", sid, key_request(4))
        assert (await service.step("t", sid, key_request(7))).replayed
