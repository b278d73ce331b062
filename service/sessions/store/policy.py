"""When a session's history gets a new snapshot: each store's own policy.

A snapshot costs about the state's size in writes and each step about a gradient's, so a
snapshot once the log since the last one reaches ``log_ratio`` state-sizes adds
``1 / log_ratio`` to the steps' write cost, and a replay (after a crash, or a load)
reads at most ``log_ratio`` state-sizes of log. ``min_log_bytes`` keeps tiny sessions
(whose events take a whole disk block or row each) from snapshotting every few steps, and
``every`` bounds how many events a replay applies whatever their size. The numbers are a
store's: a backend where writes cost differently picks its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SnapshotPolicy:
    every: int = 1000
    """Events between snapshots at the most."""
    log_ratio: float = 16.0
    """Snapshot once the log since the last snapshot is this many times the state's size."""
    min_log_bytes: int = 1 << 20
    """...but never for less log than this."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError("snapshot_every must be >= 1")

    def due(self, events: int, log_bytes: int, state_bytes: int) -> bool:
        """Whether a session with this much history since its last snapshot needs one."""
        limit = max(self.log_ratio * state_bytes, self.min_log_bytes)
        return events >= self.every or log_bytes >= limit
