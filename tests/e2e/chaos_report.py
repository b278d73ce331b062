"""After a chaos run: what the sessions hold against what the clients were told, and the
report (steps acknowledged, lost, doubled; latency overall and during failures)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import numpy as np

from service.codec import safetensors
from tests.e2e.chaos_plan import Disruption, HarnessError, Kind, Plan
from tests.e2e.chaos_workload import SAFETENSORS, Ack, SessionLoad, retry_delay, torch_replay

TOLERANCE = 1e-4
"""Between the held params and torch's replay. float32 rounding drifts by about 1e-6 per
thousand steps (the server and torch order a few operations differently); one step
applied twice or lost moves params by lr * |momentum buffer|, about 1e-2 here."""


@dataclass(frozen=True)
class SessionResult:
    sid: str
    size: int
    acknowledged: int
    server_step: int
    misnumbered: int
    max_param_error: float
    params_match: bool

    @property
    def lost(self) -> int:
        return max(0, self.acknowledged - self.server_step)

    @property
    def doubled(self) -> int:
        return max(0, self.server_step - self.acknowledged)


def _get(client: httpx.Client, url: str, accept: str, deadline_s: float) -> httpx.Response:
    """A read through the proxy, retried while the deployment settles."""
    began = time.monotonic()
    attempt = 0
    while time.monotonic() - began < deadline_s:
        attempt += 1
        response: httpx.Response | None = None
        try:
            response = client.get(url, headers={"Accept": accept})
        except httpx.TransportError:
            pass
        else:
            if response.status_code == 200:
                return response
            if response.status_code not in (502, 503, 504):
                raise HarnessError(f"GET {url}: {response.status_code} {response.text[:500]}")
        time.sleep(retry_delay(attempt, response))
    raise HarnessError(f"GET {url} not answered in {deadline_s} s")


def verify(url: str, loads: list[SessionLoad], deadline_s: float) -> list[SessionResult]:
    results = []
    with httpx.Client(timeout=30) as client:
        for load in loads:
            document = _get(
                client, f"{url}/v1/sessions/{load.sid}", "application/json", deadline_s
            ).json()
            raw = _get(client, f"{url}/v1/sessions/{load.sid}/params", SAFETENSORS, deadline_s)
            held = safetensors.decode(raw.content)[0]["w"]
            acknowledged = len(load.acks)
            reference = torch_replay(load.seed, load.size, acknowledged)
            error = float(np.max(np.abs(held - reference))) if load.size else 0.0
            results.append(
                SessionResult(
                    sid=load.sid,
                    size=load.size,
                    acknowledged=acknowledged,
                    server_step=int(document["step"]),
                    misnumbered=sum(ack.step != ack.index for ack in load.acks),
                    max_param_error=error,
                    params_match=bool(np.allclose(held, reference, rtol=TOLERANCE, atol=TOLERANCE)),
                )
            )
    return results


def _summary(seconds: list[float]) -> tuple[float, float, float]:
    if not seconds:
        return (float("nan"),) * 3
    p50, p99 = np.percentile(seconds, [50, 99])
    return float(p50), float(p99), max(seconds)


@dataclass
class Report:
    plan: Plan
    wall_s: float
    sessions: list[SessionResult]
    disruptions: list[Disruption]
    acks: list[Ack]

    @property
    def acknowledged(self) -> int:
        return len(self.acks)

    @property
    def lost(self) -> int:
        return sum(s.lost for s in self.sessions)

    @property
    def doubled(self) -> int:
        return sum(s.doubled for s in self.sessions)

    @property
    def misnumbered(self) -> int:
        return sum(s.misnumbered for s in self.sessions)

    @property
    def diverged(self) -> list[SessionResult]:
        return [s for s in self.sessions if not s.params_match]

    @property
    def replayed(self) -> int:
        return sum(ack.replayed for ack in self.acks)

    @property
    def retries(self) -> int:
        return sum(ack.attempts - 1 for ack in self.acks)

    def during(self, kind: Kind | None = None) -> list[Ack]:
        """Steps whose time in flight overlapped a failure (of ``kind``, or any)."""
        windows = [
            self.plan.failover_window(d.killed_at, d.ready_at)
            for d in self.disruptions
            if kind is None or d.kind == kind
        ]
        return [a for a in self.acks if any(a.began < end and a.ended > s for s, end in windows)]

    def latency(self, kind: Kind | None = None, *, failover: bool) -> tuple[float, float, float]:
        acks = self.during(kind) if failover else self.acks
        return _summary([ack.seconds for ack in acks])

    @property
    def worst_failover_s(self) -> float:
        """The slowest step that overlapped a replica's failover and no database outage.

        A failover (DESIGN.md 5) is a replica dying while the others and the database run:
        its sessions move once their leases expire. A database outage stops every replica
        until the database is back, which is not a failover; those steps are reported in
        their own row."""
        outages = self.during("database")
        moved = [a for a in self.during("replica") if a not in outages]
        return _summary([ack.seconds for ack in moved])[2]

    def failures(self) -> list[str]:
        """What broke the guarantees; empty when the run passed."""
        problems = []
        if self.lost:
            problems.append(f"{self.lost} acknowledged steps lost")
        if self.doubled:
            problems.append(f"{self.doubled} steps applied twice")
        if self.misnumbered:
            problems.append(f"{self.misnumbered} answers named another step than their key")
        problems += [
            f"session {s.sid} ({s.size} params) differs from torch by {s.max_param_error:.3g}"
            for s in self.diverged
        ]
        return problems

    def table(self) -> str:
        plan = self.plan
        kinds = {d.kind for d in self.disruptions}
        lines = [
            f"{plan.replicas} replica(s), {plan.storage} store, {len(self.sessions)} sessions "
            f"({', '.join(f'{s:,}' for s in plan.sizes)} float32 params), {plan.clients} "
            f"clients, {self.wall_s:.0f} s",
            "killed: "
            + ", ".join(
                f"{kind} x{sum(d.kind == kind for d in self.disruptions)}"
                for kind in ("replica", "proxy", "database")
                if kind in kinds
            ),
            "",
            f"{'steps acknowledged':<28}{self.acknowledged:>10}",
            f"{'lost':<28}{self.lost:>10}",
            f"{'applied twice':<28}{self.doubled:>10}",
            f"{'answered as another step':<28}{self.misnumbered:>10}",
            f"{'sessions differing (torch)':<28}{len(self.diverged):>10}",
            f"{'retries':<28}{self.retries:>10}",
            f"{'answered from idempotency':<28}{self.replayed:>10}",
            "",
            f"{'step latency (s)':<28}{'steps':>8}{'p50':>9}{'p99':>9}{'worst':>9}",
        ]
        rows: list[tuple[str, list[Ack], tuple[float, float, float]]] = [
            ("all steps", self.acks, self.latency(failover=False)),
            ("during any failure", self.during(), self.latency(failover=True)),
        ]
        for kind in ("replica", "proxy", "database"):
            if kind in kinds:
                rows.append(
                    (f"  {kind} killed", self.during(kind), self.latency(kind, failover=True))
                )
        for name, acks, (p50, p99, worst) in rows:
            lines.append(f"{name:<28}{len(acks):>8}{p50:>9.3f}{p99:>9.3f}{worst:>9.3f}")
        lines.append("")
        lines.append(f"{'session':<24}{'params':>10}{'acked':>8}{'server':>8}{'max |err|':>12}")
        for s in self.sessions:
            lines.append(
                f"{s.sid[:22]:<24}{s.size:>10,}{s.acknowledged:>8}{s.server_step:>8}"
                f"{s.max_param_error:>12.2e}"
            )
        return "\n".join(lines)
