"""What one commit for several sessions' small records would save on the disk store.

    python bench/group_commit.py [--sessions 4] [--rounds 60] [--dir DIR]

Each session has its own log file, so the records of steps that arrive together are in
as many files. Three ways to make ``--sessions`` such records durable, each round taking
the three in turn (a busy disk slows them alike), through the store's own appender
(``O_DIRECT`` where the filesystem allows it, blocks reserved ahead of the end):

- ``fdatasync each, in turn``: one thread, one append and ``fdatasync`` per file;
- ``fdatasync each, at once``: one thread per file, as the server's store threads do
  when sessions step together (the kernel's journal may fold the commits into one);
- ``syncfs once``: every file written, then one ``syncfs``: a group commit.

Then each of the last two once more while another file on the same filesystem holds
64 MiB written but not yet synced: ``syncfs`` must write another process's data too.
Prints median milliseconds per round of records. Linux only (``syncfs``).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.sessions.store import appender

_libc = ctypes.CDLL(None, use_errno=True)
RECORD = appender.BLOCK
"""A small step's record, padded as the log pads it: one block."""


class Logs:
    def __init__(self, directory: Path, count: int) -> None:
        self.fds: list[int] = []
        self.direct: list[bool] = []
        for n in range(count):
            fd, direct = appender.open_log(directory / f"log{n}", create=True)
            appender.reserve(fd, 0, 64 << 20)
            self.fds.append(fd)
            self.direct.append(direct)
        self.ends = [0] * count
        # Page-aligned (an anonymous mapping), as O_DIRECT needs.
        self.record = np.frombuffer(mmap.mmap(-1, RECORD), dtype=np.uint8)

    def write(self, n: int) -> None:
        """Write one record to log ``n``, not synced (what precedes ``syncfs``)."""
        os.pwrite(self.fds[n], self.record.data, self.ends[n])
        self.ends[n] += RECORD

    def append(self, n: int) -> None:
        """Append one record to log ``n`` and ``fdatasync`` it (what the store does)."""
        fd = self.fds[n]
        self.ends[n] += appender.append(fd, self.direct[n], self.ends[n], [self.record])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _dirty(directory: Path) -> None:
    with open(directory / "other", "wb") as f:
        f.write(os.urandom(1 << 20) * 64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--dir", help="a directory on the filesystem of the data directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optserve-group-", dir=args.dir) as name:
        directory = Path(name)
        logs = Logs(directory, args.sessions)
        pool = ThreadPoolExecutor(args.sessions)
        every = range(args.sessions)

        def in_turn() -> None:
            for n in every:
                logs.append(n)

        def at_once() -> None:
            list(pool.map(logs.append, every))

        def syncfs() -> None:
            for n in every:
                logs.write(n)
            if _libc.syncfs(logs.fds[0]) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")

        ways: dict[str, Callable[[], None]] = {
            "fdatasync each, in turn": in_turn,
            "fdatasync each, at once": at_once,
            "syncfs once": syncfs,
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for label, way in ways.items():
                start = time.perf_counter()
                way()
                times[label].append(time.perf_counter() - start)
        loaded: dict[str, float] = {}
        for label in ("fdatasync each, at once", "syncfs once"):
            _dirty(directory)
            start = time.perf_counter()
            ways[label]()
            loaded[label] = time.perf_counter() - start
        logs.close()
        pool.shutdown()
    print(f"\n{args.sessions} small records, one per session's log (median of {args.rounds})\n")
    print("| commit | ms per round | with 64 MiB of another file unsynced (ms) |")
    print("|---|---:|---:|")
    for label, samples in times.items():
        other = f"{loaded[label] * 1e3:.2f}" if label in loaded else ""
        print(f"| {label} | {statistics.median(samples) * 1e3:.2f} | {other} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
