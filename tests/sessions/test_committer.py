"""Small sessions' appends: native asynchronous writes into zeros written ahead, and the
writer threads they fall back to; either way a step is answered only once it is durable."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.sessions import committer as committer_module
from service.sessions.committer import Committer
from service.sessions.models import StepRequest
from service.sessions.store import DiskStore, MemoryStore, aio, appender
from service.sessions.store.aio import AsyncWrites, DirectWrite
from service.sessions.store.base import PreparedAppend
from tests.sessions.conftest import grads_for, running
from tests.sessions.reference import core_params

pytestmark = pytest.mark.anyio

SHAPES = {"w": (40, 25)}
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "Adam", "lr": 0.01},
    "params": {"w": {"shape": [40, 25]}},
}
START = grads_for(SHAPES, seed=7)


def native_aio() -> bool:
    try:
        AsyncWrites(depth=4).close()
    except OSError:
        return False
    return True


needs_aio = pytest.mark.skipif(not native_aio(), reason="no native asynchronous I/O here")


class Counting:
    """Wraps ``AsyncWrites.submit`` to count the writes that went to the kernel."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> None:
        self.submitted = 0
        self.requests = 0
        real = AsyncWrites.submit

        def submit(
            context: AsyncWrites, writes: Sequence[tuple[DirectWrite, aio.Completion]]
        ) -> int:
            self.requests += 1
            if refuse:
                raise OSError(errno.EINVAL, "io_submit: refused for the test")
            taken = real(context, writes)
            self.submitted += taken
            return taken

        monkeypatch.setattr(AsyncWrites, "submit", submit)


async def step_and_restart(root: Path, steps: int) -> tuple[dict[str, np.ndarray], Any]:
    grads = [grads_for(SHAPES, seed=i) for i in range(steps)]
    async with running(DiskStore(root)) as service:
        sid = (await service.create("t", CONFIG, START)).id
        for i, g in enumerate(grads):
            reply = await service.step("t", sid, StepRequest(grads=g, idempotency_key=f"k{i}"))
            assert reply.step == i + 1
    async with running(DiskStore(root)) as service:
        assert (await service.get("t", sid)).step == steps
        held = await service.params("t", sid)
    return held, core_params(CONFIG, START, grads)


@needs_aio
async def test_small_steps_are_appended_by_asynchronous_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    held, want = await step_and_restart(tmp_path, 40)
    # The first append of a log writes its zeros ahead; the others overwrite them.
    assert counting.submitted >= 38
    assert np.array_equal(held["w"], want["w"])


@needs_aio
async def test_appends_prepared_in_one_loop_turn_share_one_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    async with running(DiskStore(tmp_path)) as service:
        sids = [(await service.create("t", CONFIG, START)).id for _ in range(4)]
        for i in range(5):
            g = grads_for(SHAPES, seed=i)
            replies = await asyncio.gather(
                *(service.step("t", sid, StepRequest(grads=g)) for sid in sids)
            )
            assert [r.step for r in replies] == [i + 1] * 4
    assert counting.submitted >= 16 and counting.requests < counting.submitted


async def test_refused_asynchronous_writes_fall_back_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch, refuse=True)
    held, want = await step_and_restart(tmp_path, 12)
    assert counting.requests <= 2  # refused once per run, then never asked again
    assert np.array_equal(held["w"], want["w"])


async def test_without_native_asynchronous_io_appends_use_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSYS, "io_setup: Function not implemented")

    monkeypatch.setattr(committer_module, "AsyncWrites", unavailable)
    held, want = await step_and_restart(tmp_path, 12)
    assert np.array_equal(held["w"], want["w"])


async def test_a_memory_store_needs_no_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_writes(*_: Any) -> None:
        raise AssertionError("a memory store's append is not handed to a writer")

    monkeypatch.setattr(Committer, "submit", no_writes)
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIG, START)).id
        reply = await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, seed=1)))
        assert reply.step == 1


def aligned_file(path: Path, size: int) -> int:
    """A file of ``size`` written zeros, opened for direct appends."""
    path.write_bytes(bytes(size))
    fd, direct = appender.open_log(path, create=False)
    if not direct:
        os.close(fd)
        pytest.skip("this filesystem refuses O_DIRECT")
    return fd


@needs_aio
async def test_a_direct_write_lands_where_it_says_and_then_finishes(tmp_path: Path) -> None:
    fd = aligned_file(tmp_path / "log", 4 * appender.BLOCK)
    staging = appender.Staging()
    payload = memoryview(b"frame".ljust(appender.BLOCK, b"."))
    staging.fill([payload], appender.BLOCK)
    finished: list[int] = []
    write = DirectWrite(
        fd,
        staging.address,
        appender.BLOCK,
        appender.BLOCK,
        finish=lambda: finished.append(1) or appender.BLOCK,
        abandon=lambda: pytest.fail("the write succeeded"),
    )
    writer = Committer(1, "test-append")
    try:
        written = await writer.submit(PreparedAppend(lambda: pytest.fail("threads"), write))
    finally:
        writer.close()
    os.close(fd)
    data = (tmp_path / "log").read_bytes()
    assert written == appender.BLOCK and finished == [1]
    assert data[appender.BLOCK : 2 * appender.BLOCK] == bytes(payload)
    assert data[: appender.BLOCK] == bytes(appender.BLOCK) == data[2 * appender.BLOCK : 3 * 4096]


@pytest.mark.parametrize("result", [-errno.EIO, 512])
async def test_a_failed_direct_write_is_abandoned_and_reported(result: int) -> None:
    abandoned: list[int] = []
    write = DirectWrite(
        0,
        0,
        appender.BLOCK,
        0,
        finish=lambda: pytest.fail("the write failed"),
        abandon=lambda: abandoned.append(1),
    )
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    committer_module._completion(write, done)(result)
    with pytest.raises(OSError):
        done.result()
    assert abandoned == [1]


def test_a_staging_buffer_is_page_aligned_and_grows() -> None:
    staging = appender.Staging()
    small = staging.fill([memoryview(b"x" * 10)], appender.BLOCK)
    assert staging.address % mmap.PAGESIZE == 0 and bytes(small) == b"x" * 10 + bytes(4086)
    big = staging.fill([memoryview(b"y" * (1 << 17))], 1 << 17)
    assert staging.address % mmap.PAGESIZE == 0 and big.nbytes == 1 << 17
