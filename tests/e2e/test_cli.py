"""The ``optserve`` command as a person uses it: --version, --help, the start log line, a
data directory already in use, and ``optserve sessions ...`` against a running server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from tests.e2e.server_process import REPO, ServerProcess, free_port

KEY = "cli-secret"


def optserve(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    base["PYTHONPATH"] = str(REPO)
    base["COLUMNS"] = "200"  # argparse wraps help at hyphens otherwise
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("cli")
    with (root / "server.log").open("w+b") as log:
        env = {"OPTSERVE_API_KEYS": f"tenant:{KEY}", "OPTSERVE_LOG_LEVEL": "info"}
        process = ServerProcess(root / "data", log, env=env)
        process.start()
        try:
            yield process
        finally:
            process.stop()


def _create(server: ServerProcess, steps: int) -> str:
    headers = {"Authorization": f"Bearer {KEY}"}
    config = {"optimizer": {"name": "Adam", "lr": 0.1}, "params": {"w": {"shape": [2]}}}
    created = httpx.post(server.url + "/v1/sessions", json=config, headers=headers)
    assert created.status_code == 201
    session: str = created.json()["id"]
    for _ in range(steps):
        step = httpx.post(
            f"{server.url}/v1/sessions/{session}/step",
            json={"grads": {"w": [0.5, -0.5]}},
            headers=headers,
        )
        assert step.status_code == 200
    return session


def _as_user(server: ServerProcess) -> dict[str, str]:
    return {"OPTSERVE_URL": server.url, "OPTSERVE_API_KEY": KEY}


def test_version() -> None:
    done = optserve("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"optserve {metadata.version('optserve')}"


def test_help_shows_every_default() -> None:
    done = optserve("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for shown in (
        "default: 127.0.0.1; env OPTSERVE_HOST",
        "default: 8000; env OPTSERVE_PORT",
        "default: optserve-data; env OPTSERVE_DATA_DIR",
        "default: disk; env OPTSERVE_STORAGE",
        "default: info; env OPTSERVE_LOG_LEVEL",
    ):
        assert shown in text
    sessions = " ".join(optserve("sessions", "--help").stdout.split())
    assert "default: http://127.0.0.1:8000" in sessions


def test_help_never_shows_the_api_key() -> None:
    done = optserve("sessions", "--help", env={"OPTSERVE_API_KEY": "do-not-print-me"})
    assert done.returncode == 0
    assert "do-not-print-me" not in done.stdout


def test_start_log_names_storage_data_dir_and_url(server: ServerProcess) -> None:
    server.log.seek(0)
    lines = [json.loads(line) for line in server.log.read().splitlines() if line.startswith(b"{")]
    start = next(line for line in lines if line["msg"].startswith("starting optserve"))
    assert start["storage"] == "disk"
    assert start["data_dir"] == str(server.data_dir.resolve())
    assert Path(start["data_dir"]).is_absolute()
    assert start["url"] == server.url
    assert server.url in start["msg"] and start["data_dir"] in start["msg"]


def test_a_data_dir_in_use_is_one_line(server: ServerProcess) -> None:
    port = str(free_port())
    done = optserve("serve", "--port", port, "--data-dir", str(server.data_dir))
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"optserve: {server.data_dir.resolve()} is in use")
    assert httpx.get(server.url + "/readyz").status_code == 200  # the running one is unharmed


def test_sessions_list_show_export_import_delete(server: ServerProcess, tmp_path: Path) -> None:
    user = _as_user(server)
    session = _create(server, steps=3)

    listed = optserve("sessions", "list", env=user)
    assert listed.returncode == 0, listed.stderr
    assert f"{session}\tstep 3\tAdam" in listed.stdout.splitlines()

    shown = optserve("sessions", "show", session, env=user)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert (document["id"], document["step"]) == (session, 3)

    checkpoint = tmp_path / "ckpt.safetensors"
    exported = optserve("sessions", "export", session, "-o", str(checkpoint), env=user)
    assert exported.returncode == 0, exported.stderr
    state = httpx.get(
        f"{server.url}/v1/sessions/{session}/state", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert checkpoint.read_bytes() == state.content

    imported = optserve("sessions", "import", str(checkpoint), env=user)
    assert imported.returncode == 0, imported.stderr
    copy, step = imported.stdout.strip().split("\t")
    assert copy != session and step == "step 3"

    deleted = optserve("sessions", "delete", session, copy, env=user)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.splitlines() == [f"deleted {session}", f"deleted {copy}"]
    after = optserve("sessions", "list", env=user).stdout
    assert session not in after and copy not in after


def test_export_defaults_to_the_session_id(server: ServerProcess, tmp_path: Path) -> None:
    session = _create(server, steps=1)
    done = optserve("sessions", "export", session, env=_as_user(server), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / f"{session}.safetensors").stat().st_size > 0


def test_sessions_errors_are_one_line(server: ServerProcess, tmp_path: Path) -> None:
    missing = optserve("sessions", "show", "no-such-session", env=_as_user(server))
    assert missing.returncode == 1
    assert missing.stderr.startswith("optserve: 404 ") and missing.stderr.count("\n") == 1

    no_key = optserve("sessions", "list", env={"OPTSERVE_URL": server.url})
    assert no_key.returncode == 1
    assert no_key.stderr.startswith("optserve: 401 ") and no_key.stderr.count("\n") == 1

    garbage = tmp_path / "not-a-checkpoint"
    garbage.write_bytes(b"hello")
    refused = optserve("sessions", "import", str(garbage), env=_as_user(server))
    assert refused.returncode == 1 and refused.stderr.startswith("optserve: 4")

    absent = optserve("sessions", "import", str(tmp_path / "absent"), env=_as_user(server))
    assert absent.returncode == 2 and absent.stderr.startswith("optserve: cannot read")


def test_an_unreachable_server_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = optserve("sessions", "list", env={"OPTSERVE_URL": url})
    assert done.returncode == 2
    assert done.stderr.startswith(f"optserve: cannot reach {url}")
    assert done.stderr.count("\n") == 1
