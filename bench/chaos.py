"""The chaos test of DESIGN.md section 5, as long as you like, printed as a table.

    python bench/chaos.py [--replicas 3] [--storage postgres|disk] [--duration 120]
                          [--sizes 1e3,1e4,1e5,1e6] [--clients 4] [--kill-every 2,5]
                          [--lease-seconds 3] [--no-proxy-kill] [--no-database-kill]
                          [--seed 0] [--keep DIR]

A throwaway PostgreSQL cluster (the machine's initdb/pg_ctl; as root, run by the
``postgres`` user), N replicas (``python -m service serve --storage postgres``) and
HAProxy in front (deploy/haproxy.cfg on free loopback ports). Client threads step one
float32 SGD session per ``--sizes`` entry through the proxy, each step with an
Idempotency-Key and retried with it until answered; a replica is SIGKILLed every few
seconds and started again, HAProxy and PostgreSQL are each killed and restarted once.
Then every replica is killed once more and the sessions are read back: steps lost and
applied twice (both must be 0), params against a torch.optim.SGD replay, and the step
latency (first try to answer) overall and for steps that overlapped a failure.

``--storage disk`` runs one replica (disk replicas cannot share sessions): the harness
and the proxy's restarts without the database. Logs (replicas, HAProxy, PostgreSQL) stay
in ``--keep DIR`` when given. Exits 1 if a guarantee was broken.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# The harness lives with the end-to-end tests; run from anywhere in the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.chaos import Plan, run


def _pair(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--storage", choices=("postgres", "disk"), default="postgres")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of chaos")
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6", help="params per session")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument(
        "--kill-every",
        type=_pair,
        default=(2.0, 5.0),
        metavar="MIN,MAX",
        help="seconds between replica kills",
    )
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--no-proxy-kill", action="store_true")
    parser.add_argument("--no-database-kill", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the logs in this directory")
    args = parser.parse_args(argv)
    disk = args.storage == "disk"
    plan = Plan(
        replicas=1 if disk else args.replicas,
        storage=args.storage,
        sizes=tuple(int(float(s)) for s in args.sizes.split(",")),
        clients=args.clients,
        duration_s=args.duration,
        kill_every_s=args.kill_every,
        kill_proxy=not args.no_proxy_kill,
        kill_database=not (disk or args.no_database_kill),
        lease_seconds=args.lease_seconds,
        seed=args.seed,
    )
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run(plan, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="optserve-chaos-") as workdir:
            report = run(plan, Path(workdir))
    print(report.table())
    failures = report.failures()
    if plan.storage == "postgres":
        target = 2 * plan.lease_seconds
        print(
            f"\nworst step during a failover: {report.worst_failover_s:.2f} s "
            f"(target: under two lease periods, {target:.1f} s)"
        )
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
