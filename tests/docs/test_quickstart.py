"""The README's first two commands, as a newcomer runs them in a fresh virtual environment.

The first line (install the server and the Python client, then serve) runs as written in
a new ``python -m venv`` without the system's site-packages, on a copy of the working
tree; then the README's runnable Python and shell snippets run with that environment's
interpreter against that server (the torch and JavaScript ones need more than the first
line installs; tests/docs/test_snippets.py runs those). The second line is the suite
itself: .ci/run runs it on a clean machine, so here it is only checked to be that.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.docs.snippets import REPO, against, snippets
from tests.e2e.server_process import free_port

pytestmark = pytest.mark.slow


def _commands() -> list[str]:
    first = snippets(REPO / "README.md")[0]
    lines = [line.split("  #")[0].strip() for line in first.code.splitlines()]
    return [line for line in lines if line]


def _copy_tree(target: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def test_readme_quickstart_in_a_fresh_venv(tmp_path: Path) -> None:
    install_and_serve, run_tests = _commands()
    assert run_tests == "bash scripts/test.sh"
    assert run_tests in (REPO / ".ci" / "run").read_text()

    tree, venv = tmp_path / "optserve", tmp_path / "venv"
    _copy_tree(tree)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTSERVE_", "PYTHON"))}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
        VIRTUAL_ENV=str(venv),
        OPTSERVE_PORT=str(port),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    log = (tmp_path / "quickstart.log").open("w+")
    process = subprocess.Popen(
        ["bash", "-c", install_and_serve],
        cwd=tree,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # pip's and the server's processes end with the group
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"`{install_and_serve}` exited {process.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"`{install_and_serve}`: no server on {url}")
        log.seek(0)
        started = log.read()
        assert re.search(rf"storage disk.*{re.escape(str(tree / 'optserve-data'))}", started)
        assert url in started
        python = venv / "bin" / "python"
        assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
        # the dashboard's and the API reference's files came with the installed package
        for page in ("/ui", "/ui/ui.js", "/docs", "/docs/assets/swagger-ui-bundle.js"):
            assert httpx.get(url + page).status_code == 200, page
        readmes = [REPO / "README.md", REPO / "clients" / "python" / "README.md"]
        for snippet in [s for path in readmes for s in snippets(path)]:
            if not snippet.runnable or "torch" in snippet.code or snippet.language == "js":
                continue
            command = [str(python), "-c"] if snippet.language == "python" else ["bash", "-c"]
            done = subprocess.run(
                [
                    *command,
                    "set -euo pipefail\n" * (snippet.language != "python")
                    + against(snippet.code, url),
                ],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"{snippet.where}:\n{done.stdout}\n{done.stderr}"
            assert re.search(r'"status":\s*[45]\d\d', done.stdout) is None, done.stdout
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
