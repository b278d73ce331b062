"""HAProxy in a subprocess, from deploy/haproxy.cfg rendered for the replicas at hand.

The chaos harness runs the deployment's own config: the same hashing, health checks,
retries and timeouts; only the addresses differ (free loopback ports, and one server line
per replica the harness started).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

from tests.e2e.server_process import REPO, ChildProcess, free_port

TEMPLATE = REPO / "deploy" / "haproxy.cfg"
_SERVER_LINE = re.compile(r"^(?P<indent>\s*)server replica\d+ .*$")


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )


def render_config(replicas: Sequence[str], template: str | None = None) -> str:
    """deploy/haproxy.cfg with its ``server replicaN`` lines replaced by one per address.

    Servers keep the template's naming (``replicaN``, ``id N``), so the hash ring is the
    one a deployment of the same size gets.
    """
    text = TEMPLATE.read_text() if template is None else template
    lines = text.splitlines()
    found = [i for i, line in enumerate(lines) if _SERVER_LINE.match(line)]
    if not found:
        raise ValueError("the template has no 'server replicaN' lines")
    if found != list(range(found[0], found[0] + len(found))):
        raise ValueError("the template's server lines must be consecutive")
    match = _SERVER_LINE.match(lines[found[0]])
    assert match is not None
    indent = match["indent"]
    servers = [
        f"{indent}server replica{n} {address} id {n}" for n, address in enumerate(replicas, start=1)
    ]
    rendered = lines[: found[0]] + servers + lines[found[-1] + 1 :]
    return "\n".join(rendered) + "\n"


def check_config(binary: str, path: Path, env: dict[str, str] | None = None) -> str:
    """``haproxy -c -f path``; raises with HAProxy's words if the config is invalid."""
    done = subprocess.run(
        [binary, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"haproxy -c rejected {path}:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


class ProxyProcess(ChildProcess):
    """``haproxy -db`` (foreground, one process) on two free loopback ports."""

    def __init__(self, binary: str, replicas: Sequence[str], workdir: Path, log: IO[bytes]):
        super().__init__(log)
        self.binary = binary
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}"
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(render_config(replicas))
        self.env = {
            "OPTSERVE_PROXY_BIND": f"127.0.0.1:{self.port}",
            "OPTSERVE_STATS_BIND": f"127.0.0.1:{self.stats_port}",
        }
        check_config(binary, self.config, self.env)

    def start(self) -> None:
        command = [self.binary, "-db", "-f", str(self.config)]
        self._launch(command, {**os.environ, **self.env}, self.stats_url + "/", 30, "haproxy")

    def servers(self) -> dict[str, str]:
        """Each replica's state on the stats page (``UP``, ``DOWN``, ...)."""
        response = httpx.get(self.stats_url + "/;csv", timeout=5)
        response.raise_for_status()
        rows = csv.DictReader(io.StringIO(response.text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_servers_up(self, timeout_s: float = 30, *names: str) -> None:
        """Until the health checks have the named replicas (default: all) UP again."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.servers()
            wanted = [states.get(name, "") for name in names] if names else states.values()
            if states and all(state.startswith("UP") for state in wanted):
                return
            time.sleep(0.05)
        raise AssertionError(f"replicas not up behind haproxy: {states}")
