"""A replica in a subprocess, for the SIGSTOP fencing test.

    python -m tests.sessions.fenced_writer URL SESSION OWNER TTL

Holds the session's lease through :class:`service.sessions.store.leases.Leases` (as the service
does) and appends events as fast as it can, each after the last one it knows of. Prints
``acked <seq>`` after each append returned (what a server would acknowledge), flushed at
once, and ``fenced <reason>`` when the store refuses a write, then exits.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from service.sessions.store.base import Event, Fenced
from service.sessions.store.leases import Leases
from service.sessions.store.postgres import PostgresStore


def main() -> int:
    url, session_id, owner, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    store = PostgresStore(url, owner=owner, pool_size=1)
    store.open()
    leases = Leases(store, ttl=ttl, owner=owner)
    loaded = store.load_session(session_id)
    assert loaded is not None
    head = loaded.snapshot.seq + len(loaded.events)
    print("ready", flush=True)
    grads = {"w": np.arange(256, dtype=np.float32)}
    while True:
        event = Event(seq=head + 1, kind="step", at=time.time(), fingerprint=owner, grads=grads)
        try:
            leases.hold(session_id)
            store.append(session_id, event)
        except Fenced as exc:
            print(f"fenced {exc}", flush=True)
            return 0
        head += 1
        print(f"acked {head}", flush=True)
        time.sleep(0.002)


if __name__ == "__main__":
    sys.exit(main())
