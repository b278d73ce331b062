"""The values that cross the sessions <-> API boundary for federated sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class UpdateRequest:
    """One client's update: its new params or its delta, for a round or a base version."""

    client_id: str
    form: str
    """"params" (the client's new values) or "delta" (new - the values it trained from)."""
    tensors: dict[str, np.ndarray]
    num_examples: int | None = None
    round: int | None = None
    """Rounds mode: the round the client trained in."""
    base_version: int | None = None
    """Async mode: the version (session step) of the params the client trained from."""
    idempotency_key: str | None = None
    """The ``Idempotency-Key`` it was sent with: a retry with the key gets the same answer;
    the key on another update is refused."""


@dataclass(frozen=True)
class UpdateReply:
    """The acknowledgement of an accepted (or already accepted) update."""

    mode: str
    client_id: str
    version: int
    """The session's step after this update (for a duplicate: now)."""
    duplicate: bool = False
    round: int | None = None
    received: int | None = None
    """Rounds mode: how many updates the round held once this one was in."""
    round_closed: bool = False
    """Rounds mode: whether the round has closed (by this update or since)."""
    base_version: int | None = None
    staleness: int | None = None
    weight: float | None = None

    def document(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "client_id": self.client_id,
            "accepted": True,
            "duplicate": self.duplicate,
            "version": self.version,
        }
        if self.mode == "rounds":
            out.update(round=self.round, received=self.received, round_closed=self.round_closed)
        else:
            out.update(base_version=self.base_version, staleness=self.staleness, weight=self.weight)
        return out


@dataclass(frozen=True)
class RoundParams:
    """The params a client trains from, with the round and version they belong to."""

    mode: str
    round: int | None
    version: int
    tensors: dict[str, np.ndarray]
