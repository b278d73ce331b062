"""bench/floor.py's floor arithmetic: what the durable floor is made of."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from bench.floor import Row, _torch_best


def _row(torch_ms: float | None, disk_ms: float | None, beside_ms: float | None) -> Row:
    return Row("disk", 1, "safetensors", 10.0, 2.0, torch_ms, disk_ms, beside_ms, 1.0, 0.0, 0.0)


def test_the_durable_floor_is_tcp_plus_the_step_and_write_measured_together() -> None:
    assert _row(1.0, 0.8, 1.5).durable_floor_ms == 3.5
    assert _row(1.0, 0.8, 1.5).floor_ms == 3.0


def test_without_that_measurement_it_is_tcp_plus_the_larger_of_the_two() -> None:
    assert _row(1.0, 1.25, None).durable_floor_ms == 3.25
    assert _row(1.0, None, None).durable_floor_ms == 3.0


class _Reference:
    """A torch reference whose step takes ``step_s``, recording the threads it ran on."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.threads = 2
        self.steps_at: list[int] = []
        self.torch: Any = SimpleNamespace(
            get_num_threads=lambda: self.threads,
            set_num_threads=self._set,
        )

    def _set(self, count: int) -> None:
        self.threads = count

    def step_seconds(self) -> float:
        self.steps_at.append(self.threads)
        time.sleep(self.step_s)
        return self.step_s


def test_the_step_beside_the_write_is_timed_until_both_are_over() -> None:
    reference = _Reference(0.01)
    writers: list[str] = []

    def write() -> float:
        writers.append(threading.current_thread().name)
        time.sleep(0.05)
        return 0.05

    seconds = _torch_best(reference, beside=write)  # type: ignore[arg-type]
    assert 0.05 <= seconds < 0.06 + 0.05  # the write's length, not the step's, nor both
    assert reference.steps_at == [2, 1]  # torch's default threads, then one
    assert reference.threads == 2  # and its default given back
    assert len(writers) == 2 and all(name != threading.current_thread().name for name in writers)


def test_alone_the_step_is_the_faster_of_its_two_thread_counts() -> None:
    reference = _Reference(0.002)
    assert _torch_best(reference) == 0.002  # type: ignore[arg-type]
    assert reference.steps_at == [2, 1]
