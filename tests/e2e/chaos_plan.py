"""What a chaos run starts and breaks (:class:`Plan`), and what it broke (:class:`Disruption`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["replica", "proxy", "database"]


class HarnessError(AssertionError):
    """The harness could not do what it set out to (a step never answered, a 4xx...)."""


@dataclass(frozen=True)
class Plan:
    """What to run and what to break."""

    replicas: int = 3
    storage: Literal["postgres", "disk"] = "postgres"
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    """float32 parameters of each session (one session per entry)."""
    clients: int = 4
    """client threads; sessions are dealt to them in turn, each steps its own in sequence."""
    duration_s: float = 30.0
    kill_every_s: tuple[float, float] = (2.0, 5.0)
    """seconds between replica kills, drawn uniformly."""
    down_s: tuple[float, float] = (0.0, 0.5)
    """how long a killed process stays down before it is started again."""
    kill_proxy: bool = True
    kill_database: bool = True
    lease_seconds: float = 3.0
    step_deadline_s: float = 90.0
    """a step not answered after this long fails the run."""
    final_restart: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.storage == "disk" and self.replicas != 1:
            raise ValueError("disk replicas cannot share sessions: run one")
        if self.storage == "disk" and self.kill_database:
            raise ValueError("there is no database to kill on the disk store")
        if not self.sizes or min(self.sizes) < 1 or self.clients < 1:
            raise ValueError("need at least one session and one client")

    def failover_window(self, killed_at: float, ready_at: float) -> tuple[float, float]:
        """When a step counts as 'during a failover' of a process killed and back at these
        times: until HAProxy's health checks see it again (rise 2 x inter 1 s), and on the
        shared store until a killed replica's lease can have run out and been taken over
        (up to two lease periods after the kill)."""
        end = ready_at
        if self.storage == "postgres":
            end = max(end, killed_at + 2 * self.lease_seconds)
        return killed_at, end + 2.0


@dataclass(frozen=True)
class Disruption:
    kind: Kind
    target: str
    killed_at: float
    ready_at: float
