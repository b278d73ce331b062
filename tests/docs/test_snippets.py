"""Every runnable code block of the user documentation runs as pasted against a live server.

The convention (which blocks are runnable, what ``fragment`` and ``manual`` mean) is in
tests/docs/snippets.py. The only change made to a block before it runs is the server's
address: ``127.0.0.1:8000`` / ``localhost:8000`` become the test server's free port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.snippets import LANGUAGES, MARKERS, REPO, Snippet, against, every_snippet, runnable
from tests.e2e.server_process import ServerProcess, running_server


def _id(snippet: Snippet) -> str:
    return snippet.where


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("snippet-server")
    with running_server(root) as process:
        yield process


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "clients" / "python")])
    return env


def _check(done: subprocess.CompletedProcess[str], snippet: Snippet) -> None:
    assert done.returncode == 0, (
        f"{snippet.where} failed (exit {done.returncode}):\n{snippet.code}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def test_every_code_block_is_runnable_or_marked() -> None:
    blocks = every_snippet()
    assert len(blocks) > 30  # the documents were found and read
    for block in blocks:
        if block.marker is not None:
            assert block.language in LANGUAGES, f"{block.where}: only code blocks take a marker"
            assert block.marker in MARKERS, f"{block.where}: unknown marker {block.marker!r}"
    assert any(block.runnable for block in blocks)


@pytest.mark.parametrize("snippet", runnable("python"), ids=_id)
def test_python_snippet(snippet: Snippet, server: ServerProcess, tmp_path: Path) -> None:
    if "import torch" in snippet.code:
        pytest.importorskip("torch")
    script = tmp_path / "snippet.py"
    script.write_text(against(snippet.code, server.url))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _check(done, snippet)


@pytest.mark.parametrize("snippet", runnable("shell"), ids=_id)
def test_shell_snippet(snippet: Snippet, server: ServerProcess, tmp_path: Path) -> None:
    script = tmp_path / "snippet.sh"
    script.write_text("set -euo pipefail\n" + against(snippet.code, server.url))
    env = _env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _check(done, snippet)
    # curl -s exits 0 on a 4xx: an error answer is a problem document with its status
    assert re.search(r'"status":\s*[45]\d\d', done.stdout) is None, done.stdout


@pytest.mark.parametrize("snippet", runnable("js"), ids=_id)
def test_js_snippet(snippet: Snippet, server: ServerProcess, tmp_path: Path) -> None:
    node = shutil.which("node")
    built = REPO / "clients" / "js" / "dist" / "index.js"
    if node is None or not built.exists():
        pytest.skip("needs node and the built JS client (cd clients/js && npm run build)")
    modules = tmp_path / "node_modules"
    modules.mkdir()
    # what `npm install /path/to/optserve/clients/js` leaves: the package under its name
    (modules / "optserve-client").symlink_to(REPO / "clients" / "js")
    script = tmp_path / "snippet.mjs"
    script.write_text(against(snippet.code, server.url))
    done = subprocess.run(
        [node, str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _check(done, snippet)
