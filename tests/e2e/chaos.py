"""The chaos harness: replicas behind HAProxy, killed while clients step sessions.

A :class:`Deployment` starts what DESIGN.md section 5 describes, on one machine: a
throwaway PostgreSQL cluster, N replicas (``python -m service serve``) and HAProxy in
front, rendered from deploy/haproxy.cfg. Client threads step sessions of various sizes
through the proxy with an ``Idempotency-Key`` per step, retrying each step with the same
key until it is answered. Meanwhile a chaos thread SIGKILLs a random replica every few
seconds and starts it again, and kills and restarts HAProxy once and PostgreSQL once.

Afterwards every replica is killed and started once more (the final state is read back
from the store, not from a replica's memory), and :func:`verify` checks that:

- every acknowledged step is in the session exactly once: the session's step count is the
  number of steps acknowledged, and the answer to step i's key said step i;
- the session's params equal a replay of the same gradients through ``torch.optim.SGD``.

The :class:`Report` counts steps acknowledged, lost and doubled, and the step latency
(from the first try to the answer, retries included): overall and for steps that overlapped
a failure.

On the disk store one replica is all there is (disk replicas cannot share sessions); the
harness then exercises itself: process management, the proxy's restarts, the checker.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.chaos_plan import Disruption, HarnessError, Kind, Plan
from tests.e2e.chaos_report import Report, verify
from tests.e2e.chaos_workload import client_loop, create_session
from tests.e2e.deployment import Deployment

__all__ = ["Deployment", "HarnessError", "Plan", "Report", "run"]


def chaos_schedule(plan: Plan) -> list[tuple[float, Kind]]:
    """(seconds from the start, what to kill), in order."""
    rng = random.Random(plan.seed)
    events: list[tuple[float, Kind]] = []
    at = rng.uniform(*plan.kill_every_s)
    while at < plan.duration_s:
        events.append((at, "replica"))
        at += rng.uniform(*plan.kill_every_s)
    if plan.kill_proxy:
        events.append((plan.duration_s * 0.35, "proxy"))
    if plan.kill_database:
        events.append((plan.duration_s * 0.65, "database"))
    return sorted(events)


def chaos_loop(
    deployment: Deployment,
    began: float,
    stop: threading.Event,
    abort: threading.Event,
    disruptions: list[Disruption],
    errors: list[BaseException],
) -> None:
    """Kill and restart processes on the plan's schedule, one at a time."""
    plan = deployment.plan
    rng = random.Random(plan.seed + 1)
    try:
        for at, kind in chaos_schedule(plan):
            if stop.wait(max(0.0, began + at - time.monotonic())):
                return
            down = rng.uniform(*plan.down_s)
            killed = time.monotonic()
            if kind == "replica":
                n = rng.randrange(len(deployment.replicas))
                target = f"replica{n + 1}"
                deployment.restart_replica(n, down)
            elif kind == "proxy":
                target = "haproxy"
                deployment.restart_proxy(down)
            else:
                target = "postgres"
                deployment.restart_database(down)
            disruptions.append(Disruption(kind, target, killed, time.monotonic()))
    except BaseException as exc:  # reported by load_and_break()
        errors.append(exc)
        abort.set()
        stop.set()


def run(plan: Plan, workdir: Path) -> Report:
    """Start the deployment, load it, break it, check it; every process is stopped after."""
    with Deployment(plan, workdir) as deployment:
        return load_and_break(deployment)


def load_and_break(deployment: Deployment) -> Report:
    plan, url = deployment.plan, deployment.url
    with httpx.Client(timeout=60) as client:
        loads = [
            create_session(client, url, plan.seed * 1000 + i, size)
            for i, size in enumerate(plan.sizes)
        ]
    stop, abort = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    disruptions: list[Disruption] = []
    clients = [
        threading.Thread(
            target=client_loop,
            args=(url, loads[i :: plan.clients], plan, stop, abort, errors),
            daemon=True,
        )
        for i in range(min(plan.clients, len(loads)))
    ]
    began = time.monotonic()
    chaos = threading.Thread(
        target=chaos_loop,
        args=(deployment, began, stop, abort, disruptions, errors),
        daemon=True,
    )
    for thread in [*clients, chaos]:
        thread.start()
    try:
        stop.wait(plan.duration_s)
        chaos.join(timeout=plan.duration_s + 120)
        stop.set()
        for thread in clients:
            thread.join(timeout=plan.step_deadline_s + 30)
        if chaos.is_alive() or any(thread.is_alive() for thread in clients):
            raise HarnessError("a client or the chaos thread did not finish")
    except BaseException:
        abort.set()
        raise
    finally:
        stop.set()
    if errors:
        raise errors[0]
    wall = time.monotonic() - began
    if plan.final_restart:
        for n in range(len(deployment.replicas)):
            deployment.replicas[n].kill()
        for replica in deployment.replicas:
            replica.start()
    sessions = verify(url, loads, plan.step_deadline_s)
    acks = [ack for load in loads for ack in load.acks]
    return Report(plan, wall, sessions, disruptions, acks)
