"""Damage a stopped server's data directory the ways disks do, then start it again.

Two sessions hold their params (Adam, float64) and take 35 keyed steps each, with a
snapshot every 10 events, so that session A's directory holds snapshots 10, 20, 30 and
log segments 10, 20, 30 (the idempotency window keeps the oldest). One kind of damage is
done to a copy of that directory at a time, and for each:

- no wrong state is served as healthy: a session either answers with exactly the params
  of a torch replay of its 35 steps, or says it is damaged (503 ``session-damaged`` for
  steps and reads, ``"health": "damaged"`` in its document and in the list);
- no file is deleted, and a damaged session's files are left byte for byte;
- an acknowledged key is never applied twice: a retry of step 35 is answered from the
  kept reply or refused, never applied as step 36;
- the other session is served as before;
- ``optserve check`` (on the stopped server) finds it: exit 1 and the session named.

``optserve repair`` then brings a damaged session back to a chosen step, and it goes on
exactly like a torch replay of its first steps followed by the new ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.server_process import REPO, ServerProcess

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

STEPS = 35
SHAPES = {"w": (4, 3), "b": (3,)}
LR = 0.01
ENV = {"OPTSERVE_SNAPSHOT_EVERY": "10", "OPTSERVE_IDEMPOTENCY_WINDOW": "16"}
BLOCK = 4096


def initial(session: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, session)))
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def grads(session: str, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([sum(map(ord, session)), i])
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def torch_params(session: str, steps: list[int]) -> dict[str, np.ndarray]:
    """Params after torch's Adam takes the gradients of ``steps`` in order."""
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in initial(session).items()}
    for t in tensors.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(tensors.values()), lr=LR)
    for i in steps:
        for name, t in tensors.items():
            t.grad = torch.tensor(grads(session, i)[name], dtype=torch.float64)
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def create(client: httpx.Client, session: str) -> str:
    body = {
        "optimizer": {"name": "Adam", "lr": LR},
        "params": {
            k: {"shape": list(v.shape), "data": v.tolist()} for k, v in initial(session).items()
        },
        "param_groups": [{"params": ["b"]}],
        "dtype": "float64",
        "labels": {"name": session},
    }
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


def step(client: httpx.Client, sid: str, session: str, i: int, key: str) -> httpx.Response:
    body = {"grads": {k: v.tolist() for k, v in grads(session, i).items()}}
    return client.post(f"/v1/sessions/{sid}/step", json=body, headers={"Idempotency-Key": key})


def held(client: httpx.Client, sid: str) -> dict[str, np.ndarray]:
    response = client.get(f"/v1/sessions/{sid}/params")
    assert response.status_code == 200, response.text
    return {k: np.array(v) for k, v in response.json()["params"].items()}


def assert_params(client: httpx.Client, sid: str, session: str, steps: list[int]) -> None:
    got, want = held(client, sid), torch_params(session, steps)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12)


def files(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def optserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A stopped server's data directory: sessions A and B, 35 keyed steps each."""
    root = tmp_path_factory.mktemp("pristine")
    with open(root / "server.log", "wb") as log:
        server = ServerProcess(root / "data", log, ENV)
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                ids = {name: create(client, name) for name in ("A", "B")}
                for i in range(1, STEPS + 1):
                    for name, sid in ids.items():
                        response = step(client, sid, name, i, f"k{i}")
                        assert response.status_code == 200 and response.json()["step"] == i
                    if i % 10 == 0:
                        # Snapshots are written in the background; one still being written
                        # would put the next off. Wait, so that the layout is always the same.
                        wait_for(functools.partial(snapshots_exist, root / "data", ids, i))
        finally:
            server.stop()
    return root / "data", ids


def snapshots_exist(data: Path, ids: dict[str, str], seq: int) -> bool:
    return all(snap_of(data, sid, seq).exists() for sid in ids.values())


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def sessions_dir(data: Path, sid: str) -> Path:
    return data / "sessions" / sid


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def log_of(data: Path, sid: str, start: int) -> Path:
    return sessions_dir(data, sid) / f"log-{start:020d}.bin"


def snap_of(data: Path, sid: str, seq: int) -> Path:
    return sessions_dir(data, sid) / f"snap-{seq:020d}.safetensors"


def flip_snapshot_data(data: Path, ids: dict[str, str]) -> None:
    path = snap_of(data, ids["A"], 10)
    flip(path, path.stat().st_size - 5)  # inside the last tensor's bytes


def flip_oldest_segment_early(data: Path, ids: dict[str, str]) -> None:
    flip(log_of(data, ids["A"], 10), 100)


def damage_middle_record_of_newest_segment(data: Path, ids: dict[str, str]) -> None:
    path = log_of(data, ids["A"], 30)
    assert path.stat().st_size == 5 * BLOCK  # events 31..35, one block each
    flip(path, 2 * BLOCK + 200)  # event 33


def delete_database(data: Path, ids: dict[str, str]) -> None:
    for path in data.glob("optserve.sqlite3*"):
        path.unlink()


def truncate_every_snapshot(data: Path, ids: dict[str, str]) -> None:
    for path in sessions_dir(data, ids["A"]).glob("snap-*"):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def zero_a_block(data: Path, ids: dict[str, str]) -> None:
    path = log_of(data, ids["A"], 20)
    raw = bytearray(path.read_bytes())
    raw[3 * BLOCK : 4 * BLOCK] = bytes(BLOCK)  # event 24
    path.write_bytes(bytes(raw))


def copy_in_another_sessions_segment(data: Path, ids: dict[str, str]) -> None:
    shutil.copyfile(log_of(data, ids["B"], 30), log_of(data, ids["A"], 30))


def swap_snapshot_with_an_older_one(data: Path, ids: dict[str, str]) -> None:
    shutil.copyfile(snap_of(data, ids["A"], 10), snap_of(data, ids["A"], 20))


Damage = Callable[[Path, dict[str, str]], None]
CASES: dict[str, tuple[Damage, bool]] = {
    # name: (damage, whether session A can still be served exactly)
    "snapshot-byte-flipped": (flip_snapshot_data, True),
    "oldest-segment-byte-flipped": (flip_oldest_segment_early, False),
    "newest-segment-middle-record": (damage_middle_record_of_newest_segment, False),
    "database-deleted": (delete_database, True),
    "every-snapshot-truncated": (truncate_every_snapshot, False),
    "zeroed-4k-block": (zero_a_block, False),
    "segment-of-another-session": (copy_in_another_sessions_segment, False),
    "snapshot-swapped-with-older": (swap_snapshot_with_an_older_one, True),
}


@pytest.fixture
def damaged_copy(
    request: pytest.FixtureRequest, tmp_path: Path, pristine: tuple[Path, dict[str, str]]
) -> Iterator[tuple[Path, dict[str, str]]]:
    source, ids = pristine
    data = tmp_path / "data"
    shutil.copytree(source, data)
    yield data, ids


def serve(data: Path, log_path: Path) -> tuple[ServerProcess, Any]:
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the caller with the server
    server = ServerProcess(data, log, ENV)
    server.start()
    return server, log


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_noticed_and_kept(
    case: str, damaged_copy: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    data, ids = damaged_copy
    damage, servable = CASES[case]
    damage(data, ids)
    a_dir = sessions_dir(data, ids["A"])
    before = files(a_dir)

    checked = optserve("check", "--data-dir", str(data))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = next(x for x in checked.stdout.splitlines() if x.startswith(ids["A"]))
    assert ("DAMAGED" in line) != servable, checked.stdout
    assert not servable or "damaged file" in checked.stdout or "catalog" in checked.stdout
    b_line = next(x for x in checked.stdout.splitlines() if x.startswith(ids["B"]))
    assert f"ok at step {STEPS}" in b_line

    server, log = serve(data, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # The untouched session is served as it was.
            assert_params(client, ids["B"], "B", list(range(1, STEPS + 1)))
            doc = client.get(f"/v1/sessions/{ids['A']}").json()
            listed = {s["id"]: s for s in client.get("/v1/sessions").json()["sessions"]}
            assert listed[ids["A"]]["health"] == doc["health"]
            assert listed[ids["B"]]["health"] == "ok"
            retry = step(client, ids["A"], "A", STEPS, f"k{STEPS}")
            if servable:
                assert doc["health"] == "ok" and doc["damage"] is None and doc["step"] == STEPS
                assert_params(client, ids["A"], "A", list(range(1, STEPS + 1)))
                assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
                assert retry.json()["step"] == STEPS
                # A key applied before the kept window is refused, not applied again.
                assert step(client, ids["A"], "A", 12, "k12").status_code == 409
            else:
                assert doc["health"] == "damaged" and doc["damage"], doc
                assert retry.status_code == 503
                assert retry.json()["type"] == "/problems/session-damaged"
                for path in ("params", "state"):
                    refused = client.get(f"/v1/sessions/{ids['A']}/{path}")
                    assert refused.status_code == 503, refused.text
                    assert refused.json()["type"] == "/problems/session-damaged"
                assert client.delete(f"/v1/sessions/{ids['A']}").status_code == 503
                new = step(client, ids["A"], "A", STEPS + 1, "fresh")
                assert new.status_code == 503
    finally:
        server.stop()
        log.close()
    after = files(a_dir)
    assert before.keys() <= after.keys(), "a file was deleted"
    if not servable:
        assert after == before, "a damaged session's files were changed"
    # Recovery reports in JSON lines, at warning level or above.
    lines = [json.loads(x) for x in (tmp_path / "server.log").read_text().splitlines() if x]
    reports = [x for x in lines if x.get("session") == ids["A"]]
    assert all(x["level"] in ("warning", "error") and "ts" in x for x in reports)
    # (A lost catalog was already rebuilt by the check: the server had nothing to say.)
    assert reports or case == "database-deleted"


def test_check_refuses_a_data_directory_a_server_holds(
    damaged_copy: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    data, _ = damaged_copy
    server, log = serve(data, tmp_path / "server.log")
    try:
        checked = optserve("check", "--data-dir", str(data))
        repaired = optserve("repair", "x", "--to-step", "1", "--data-dir", str(data))
    finally:
        server.stop()
        log.close()
    for refused in (checked, repaired):
        assert refused.returncode == 2 and "in use by a running optserve server" in refused.stderr
    assert optserve("check", "--data-dir", str(data)).returncode == 0


def test_repair_brings_a_damaged_session_back_to_a_chosen_step(
    damaged_copy: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    data, ids = damaged_copy
    damage_middle_record_of_newest_segment(data, ids)
    sid = ids["A"]
    old_files = files(sessions_dir(data, sid))

    refused = optserve("repair", sid, "--to-step", "34", "--data-dir", str(data))
    assert refused.returncode == 1
    assert "steps that can: 10-32" in refused.stderr, refused.stderr

    repaired = optserve("repair", sid, "--to-step", "25", "--data-dir", str(data))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    [aside] = (data / "quarantine").iterdir()
    assert files(aside) == old_files  # kept whole, not destroyed
    checked = optserve("check", "--data-dir", str(data))
    assert checked.returncode == 0, checked.stdout
    assert f"{sid} (tenant " in checked.stdout and "ok at step 25" in checked.stdout

    server, log = serve(data, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            doc = client.get(f"/v1/sessions/{sid}").json()
            assert doc["health"] == "ok" and doc["step"] == 25
            assert_params(client, sid, "A", list(range(1, 26)))
            # Keys of the steps it dropped were acknowledged once: never applied again.
            dropped = step(client, sid, "A", 30, "k30")
            assert dropped.status_code == 409, dropped.text
            # A retry of a step it kept is answered from its reply.
            kept = step(client, sid, "A", 25, "k25")
            assert kept.status_code == 200 and kept.headers["Idempotent-Replayed"] == "true"
            for i in range(100, 112):
                response = step(client, sid, "A", i, f"after-{i}")
                assert response.status_code == 200 and response.json()["step"] == 25 + i - 99
            assert_params(client, sid, "A", [*range(1, 26), *range(100, 112)])
    finally:
        server.stop()
        log.close()


def test_a_server_rebuilds_a_lost_catalog_itself(
    damaged_copy: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    data, ids = damaged_copy
    delete_database(data, ids)
    server, log = serve(data, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for name, sid in ids.items():
                doc = client.get(f"/v1/sessions/{sid}").json()
                assert doc["health"] == "ok" and doc["labels"] == {"name": name}
                assert_params(client, sid, name, list(range(1, STEPS + 1)))
                # Keys in the log, and keys archived (compacted) before the database was lost.
                for i in (12, 5):
                    refused = step(client, sid, name, i, f"k{i}")
                    assert refused.status_code == 409, refused.text
                    assert refused.json()["applied_at_step"] == i
    finally:
        server.stop()
        log.close()
    lines = [json.loads(x) for x in (tmp_path / "server.log").read_text().splitlines() if x]
    restored = {x["session"] for x in lines if "catalog" in x["msg"] and x["level"] == "warning"}
    assert restored == set(ids.values())
