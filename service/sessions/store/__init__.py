"""Where sessions' histories are kept: one interface; memory, disk and PostgreSQL backends.

The PostgreSQL store (:mod:`service.sessions.store.postgres`) is imported on its own: it
needs the optional ``postgres`` extra (psycopg).
"""

from __future__ import annotations

import os

from service.sessions.store.base import Event, KeyRecord, SessionRecord, Snapshot, Store
from service.sessions.store.disk import DiskStore
from service.sessions.store.memory import MemoryStore


def make_store(kind: str, data_dir: str | os.PathLike[str]) -> Store:
    """The store a server runs on: ``"disk"`` under ``data_dir``, or ``"memory"``."""
    if kind == "disk":
        return DiskStore(data_dir)
    if kind == "memory":
        # A server in memory mode never restarts into its sessions: keep no history.
        return MemoryStore(keep_history=False)
    raise ValueError(f"storage must be 'disk' or 'memory', got {kind!r}")


__all__ = [
    "DiskStore",
    "Event",
    "KeyRecord",
    "MemoryStore",
    "SessionRecord",
    "Snapshot",
    "Store",
    "make_store",
]
