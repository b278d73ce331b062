"""The HTTP app on ``storage="postgres"``: restarts, a database lost and back, startup.

A real PostgreSQL throughout (tests/postgres_cluster.py); the numbers are checked against
``InProcess`` (core run in the test) and against exported checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient

from tests.api.conftest import adam_config, grads, make_client, problem
from tests.api.reference import InProcess
from tests.postgres_cluster import Cluster, free_port

ROOT = Path(__file__).resolve().parents[2]


def _postgres(url: str, **settings: Any) -> TestClient:
    return make_client(storage="postgres", database_url=url, **settings)


def _step(client: TestClient, sid: str, seed: int, key: str | None = None) -> Any:
    body = {"grads": {n: v.tolist() for n, v in grads(seed).items()}}
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"/v1/sessions/{sid}/step", json=body, headers=headers)


def test_sessions_come_back_with_their_state_after_a_restart(postgres_url: str) -> None:
    exported: dict[str, bytes] = {}
    infos: dict[str, Any] = {}
    # Snapshots every 3 steps, so recovery starts from a compacted history for some.
    with _postgres(postgres_url, snapshot_every=3) as client:
        sids = []
        manual = {"name": "StepLR", "step_size": 1, "gamma": 0.5, "interval": "manual"}
        for i in range(3):
            config = adam_config(labels={"n": str(i)}, **({"schedule": manual} if i == 1 else {}))
            created = client.post("/v1/sessions", json=config)
            assert created.status_code == 201, created.text
            sids.append(created.json()["id"])
        for i, sid in enumerate(sids):
            for seed in range(2 + 4 * i):
                assert _step(client, sid, seed, key=f"{sid}-{seed}").status_code == 200
        edit = client.patch(f"/v1/sessions/{sids[0]}/param_groups/0", json={"lr": 0.05})
        assert edit.status_code == 200, edit.text
        assert client.post(f"/v1/sessions/{sids[1]}/schedule/step").status_code == 200
        for sid in sids:
            infos[sid] = client.get(f"/v1/sessions/{sid}").json()
            exported[sid] = client.get(f"/v1/sessions/{sid}/state").content
    with _postgres(postgres_url) as client:
        listed = client.get("/v1/sessions").json()
        assert sorted(s["id"] for s in listed["sessions"]) == sorted(sids)
        for sid in sids:
            assert client.get(f"/v1/sessions/{sid}").json() == infos[sid]
            assert client.get(f"/v1/sessions/{sid}/state").content == exported[sid]
        # A retry of the last step is answered from the replayed history, not applied again.
        last = 2 + 4 * 2 - 1
        again = _step(client, sids[2], last, key=f"{sids[2]}-{last}")
        assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
        # And the sessions go on stepping where they were, as core would.
        reference = InProcess(adam_config())
        for seed in range(2 + 4 * 2 + 1):
            expected = reference.step(grads(seed))
        reply = _step(client, sids[2], 2 + 4 * 2, key="next")
        assert reply.status_code == 200, reply.text
        for name, delta in reply.json()["deltas"].items():
            np.testing.assert_array_equal(np.asarray(delta, dtype=np.float32), expected[name])


def test_a_lost_database_answers_503_and_steps_resume_when_it_is_back(
    own_postgres: Cluster,
) -> None:
    reference = InProcess(adam_config())
    with _postgres(own_postgres.url) as client:
        sid = client.post("/v1/sessions", json=adam_config()).json()["id"]
        for seed in range(3):
            assert _step(client, sid, seed, key=f"k{seed}").status_code == 200
            reference.step(grads(seed))
        own_postgres.stop()
        # A keyed step fails looking up its key: nothing changed, reads still answer.
        lost = _step(client, sid, 3, key="k3")
        problem(lost, 503, "storage-unavailable")
        assert lost.headers["retry-after"] == "1"
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == 3
        # An unkeyed one fails at its append: the session cannot be reloaded to check what
        # the database holds, so it answers 503 until the database is back.
        problem(_step(client, sid, 3), 503, "storage-unavailable")
        problem(client.get(f"/v1/sessions/{sid}"), 503, "storage-unavailable")
        assert client.get("/readyz").status_code == 503
        own_postgres.start()
        deadline = time.monotonic() + 30
        while (reply := _step(client, sid, 3, key="k3")).status_code == 503:
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.2)
        assert reply.status_code == 200, reply.text
        assert reply.json()["step"] == 4  # the failed attempt was not applied
        expected = reference.step(grads(3))
        for name, delta in reply.json()["deltas"].items():
            np.testing.assert_array_equal(np.asarray(delta, dtype=np.float32), expected[name])
        assert client.get("/readyz").status_code == 200


def test_serve_refuses_to_start_without_its_database() -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--storage", "postgres",
         "--database-url", f"postgresql://optserve:secret@127.0.0.1:{port}/optserve"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"optserve: cannot reach the database at postgresql://127.0.0.1:{port}/"
    )
    assert "secret" not in lines[0]


def test_serve_runs_on_postgres_and_a_restart_finds_the_session(postgres_url: str) -> None:
    def serve() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port),
             "--storage", "postgres", "--database-url", postgres_url],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OPTSERVE_LOG_LEVEL": "warning"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.1)

    def stop(process: subprocess.Popen[bytes]) -> None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    body = {"grads": {n: v.tolist() for n, v in grads(0).items()}}
    process, url = serve()
    try:
        sid = httpx.post(f"{url}/v1/sessions", json=adam_config()).json()["id"]
        first = httpx.post(f"{url}/v1/sessions/{sid}/step", json=body)
        assert first.status_code == 200, first.text
    finally:
        stop(process)
    process, url = serve()
    try:
        assert httpx.get(f"{url}/v1/sessions/{sid}").json()["step"] == 1
        # The first server released its lease at shutdown: this one steps at once.
        second = httpx.post(f"{url}/v1/sessions/{sid}/step", json=body)
        assert second.status_code == 200 and second.json()["step"] == 2, second.text
    finally:
        stop(process)
