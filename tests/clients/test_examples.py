"""Every example in examples/ runs against a live server and checks its own result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(command: list[str], timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    # The examples import this checkout's client, as the tests do.
    client_src = str(EXAMPLES.parent / "clients" / "python")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [client_src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("wire", ["safetensors", "json"])
def test_numpy_linear_regression(live_url: str, wire: str) -> None:
    script = str(EXAMPLES / "numpy_linear_regression.py")
    out = run([sys.executable, script, "--url", live_url, "--wire", wire])
    assert "largest weight error" in out


@pytest.mark.torch
def test_digits_remote_vs_local(live_url: str) -> None:
    out = run([sys.executable, str(EXAMPLES / "digits_remote_vs_local.py"), "--url", live_url])
    assert "largest parameter difference" in out and "test accuracy" in out


@pytest.mark.torch
def test_digits_accumulate_ema(live_url: str, tmp_path: Path) -> None:
    png = tmp_path / "history.png"
    script = str(EXAMPLES / "digits_accumulate_ema.py")
    out = run([sys.executable, script, "--url", live_url, "--epochs", "3", "--png", str(png)])
    assert "EMA weights" in out and png.stat().st_size > 1000


def test_curl_walkthrough(live_url: str) -> None:
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the walkthrough needs {', '.join(missing)}")
    out = run(["bash", str(EXAMPLES / "curl_walkthrough.sh"), "--url", live_url])
    assert out.rstrip().endswith("walkthrough complete")


def test_curl_walkthrough_with_an_api_key(live_url_with_keys: str) -> None:
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.skip("the walkthrough needs curl and jq")
    script = str(EXAMPLES / "curl_walkthrough.sh")
    out = run(["bash", script, "--url", live_url_with_keys, "--api-key", "key-alice"])
    assert out.rstrip().endswith("walkthrough complete")
