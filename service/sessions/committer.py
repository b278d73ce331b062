"""Small sessions' appends, written without the event loop waiting or handing off the GIL.

A durable append of a small step costs the device a fraction of a millisecond, but a
thread pool turns it into a dozen GIL handovers between the event loop and its worker
(the submit, the wake-up, each system call's release and re-acquisition, the result and
the loop's wake-up), and the loop holds the GIL most of that time, so each handover
waits. With four clients stepping 1k-parameter sessions, a pool's handovers cost the
server more CPU than the steps themselves.

So the event loop prepares each append (the encoding: all the Python work), and then:

- where the store offers a :class:`DirectWrite` (an overwrite of zeros a log wrote
  ahead, see ``appender``) and the kernel has native asynchronous I/O, the loop submits
  it itself (``aio``) and is told of its completion through an ``eventfd`` it watches:
  no thread at all;
- otherwise a writer thread runs the prepared write, whose system calls release the
  GIL. A writer takes every write queued meanwhile and hands their results back to the
  loop in one wake-up; a few writers run side by side, so that one slow device write does
  not hold up other sessions.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from service.sessions.store.aio import AsyncWrites, DirectWrite
from service.sessions.store.base import PreparedAppend

log = logging.getLogger("optserve.runtime")

Write = Callable[[], int]
_Finished = list[tuple["asyncio.Future[int]", int | None, BaseException | None]]


class Committer:
    def __init__(self, writers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Write, asyncio.Future[int]] | None] = (
            queue.SimpleQueue()
        )
        self._writers = writers
        self._name = name
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._want_aio = True
        """Until the kernel refuses asynchronous writes (then never again)."""
        self._aio: AsyncWrites | None = None
        self._batch: list[tuple[PreparedAppend, asyncio.Future[int]]] = []

    @property
    def asynchronous(self) -> bool:
        """Whether prepared appends may offer a :class:`DirectWrite` (one is submitted)."""
        return self._want_aio

    def submit(self, prepared: PreparedAppend) -> asyncio.Future[int]:
        """Write ``prepared``; its result or error arrives on the event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._start(loop)
        done: asyncio.Future[int] = loop.create_future()
        if prepared.direct is not None and self._aio is not None:
            # Submitted with the others prepared in this turn of the loop, in one request.
            if not self._batch:
                loop.call_soon(self._submit_batch)
            self._batch.append((prepared, done))
        else:
            self._queue.put((prepared.write, done))
        return done

    def _submit_batch(self) -> None:
        batch, self._batch = self._batch, []
        while batch and self._aio is not None:
            writes = []
            for prepared, done in batch:
                assert prepared.direct is not None
                writes.append((prepared.direct, _completion(prepared.direct, done)))
            try:
                batch = batch[self._aio.submit(writes) :]
            except OSError as exc:
                # Nothing of the rest was written: they, and the writes after them, go to
                # the writer threads.
                log.warning("asynchronous writes refused; appends use threads (%s)", exc)
                assert self._loop is not None
                self._stop_aio(self._loop)
        for prepared, done in batch:
            self._queue.put((prepared.write, done))

    def close(self) -> None:
        """Stop once the writes submitted so far are done."""
        if self._batch:
            self._submit_batch()
        if self._loop is not None:
            self._stop_aio(self._loop)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._loop = None

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close()
        self._loop = loop
        self._threads = [
            threading.Thread(target=self._run, args=(loop,), name=f"{self._name}_{n}", daemon=True)
            for n in range(self._writers)
        ]
        for thread in self._threads:
            thread.start()
        if self._want_aio:
            try:
                self._aio = AsyncWrites()
            except OSError as exc:
                log.info("no native asynchronous I/O; appends use threads (%s)", exc)
                self._want_aio = False
                return
            loop.add_reader(self._aio.fileno, self._aio.reap)

    def _stop_aio(self, loop: asyncio.AbstractEventLoop) -> None:
        aio, self._aio = self._aio, None
        self._want_aio = False
        if aio is not None:
            # In-flight writes still complete: hand them their results before closing.
            while aio.in_flight:
                aio.wait()
            if not loop.is_closed():
                loop.remove_reader(aio.fileno)
            aio.close()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            finished: _Finished = []
            for write, done in batch:
                try:
                    finished.append((done, write(), None))
                except BaseException as exc:
                    finished.append((done, None, exc))
            if finished:
                try:
                    loop.call_soon_threadsafe(_resolve, finished)
                except RuntimeError:
                    return  # the loop is closed: nobody waits for these
            if item is None:
                return


def _completion(write: DirectWrite, done: asyncio.Future[int]) -> Callable[[int], None]:
    def complete(result: int) -> None:
        if result == write.length:
            outcome: tuple[int | None, BaseException | None] = (write.finish(), None)
        else:
            try:
                write.abandon()
            except OSError:
                log.exception("a failed write could not be cut from its log")
            error = OSError(-result, "asynchronous write failed") if result < 0 else None
            outcome = (None, error or OSError(f"short write: {result} of {write.length} bytes"))
        _resolve([(done, *outcome)])

    return complete


def _resolve(finished: _Finished) -> None:
    for done, written, error in finished:
        if done.cancelled():
            continue
        if error is not None:
            done.set_exception(error)
        else:
            assert written is not None
            done.set_result(written)
