"""Round-trip time of one step over HTTP, next to the same step in-process with torch.optim.

    python bench/http_step.py [--sizes 1e3,1e4,1e5,1e6,1e7] [--wires json,safetensors]
                              [--storage memory,disk] [--throughput-seconds 10] [--clients 4]

A real server (``python -m service serve``) runs in a subprocess on a free loopback port,
once per storage mode. Each row is one Adam session over one float32 tensor: the median
wall time from sending a step request (bodies pre-encoded, keep-alive connection) to
having read the whole response, next to ``torch.optim.Adam.step()`` on a tensor of the
same size in this process. ``ratio`` is HTTP over torch.

The throughput part runs ``--clients`` processes, each stepping its own 1k-parameter
session with JSON bodies as fast as the server answers, and prints steps per second.
Clients speak HTTP/1.1 over raw sockets so that the number measures the server, not an
HTTP library. Needs torch for the in-process column (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.codec import safetensors  # noqa: E402

SAFETENSORS = "application/vnd.optserve.safetensors"


# -- a minimal keep-alive HTTP/1.1 client ------------------------------------------------


class Connection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "", accept: str = ""
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        return self.read()

    def send_prepared(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        return self.read()

    def read(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        chunks = [rest]
        have = len(rest)
        while have < length:
            chunk = self.sock.recv(max(65536, min(length - have, 1 << 24)))
            if not chunk:
                raise ConnectionError("server closed the connection")
            chunks.append(chunk)
            have += len(chunk)
        data = b"".join(chunks)
        self.buffer = data[length:]
        return status, data[:length]

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def prepared_request(path: str, body: bytes, content_type: str, accept: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\nAccept: {accept}\r\n\r\n"
    )
    return head.encode() + body


# -- the server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(port: int, process: subprocess.Popen[bytes], path: str) -> None:
    """Until ``path`` answers 200; a server that exits or takes a minute is an error."""
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = Connection(port)
            status, _ = conn.request("GET", path)
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.1)


@contextmanager
def serving(
    command: list[str], port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` (a server on ``port``) as a subprocess, healthy, stopped on exit."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(port, process, "/healthz")
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@contextmanager
def server(storage: str, access_log: bool) -> Iterator[tuple[int, int, Path]]:
    """``python -m service serve`` on ``storage`` in a fresh data directory: its port,
    pid and data directory."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="optserve-bench-") as data:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")},
            "OPTSERVE_STORAGE": storage,
            "OPTSERVE_DATA_DIR": data,
            "OPTSERVE_MAX_BODY_BYTES": str(1 << 30),
            "OPTSERVE_LOG_LEVEL": "warning",
            "OPTSERVE_ACCESS_LOG": "true" if access_log else "false",
        }
        command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
        with serving(command, port, env) as process:
            yield port, process.pid, Path(data)


def create_session(conn: Connection, size: int) -> str:
    config = {"optimizer": {"name": "Adam", "lr": 1e-3}, "params": {"w": {"shape": [size]}}}
    status, body = conn.request(
        "POST", "/v1/sessions", json.dumps(config).encode(), "application/json"
    )
    if status != 201:
        raise RuntimeError(f"create failed: {status} {body[:300]!r}")
    session_id: str = json.loads(body)["id"]
    return session_id


def step_bodies(size: int, wire: str, count: int = 2) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(size)
    bodies = []
    for _ in range(count):
        grad = rng.standard_normal(size, dtype=np.float32)
        if wire == "json":
            text = json.dumps({"grads": {"w": grad.tolist()}}).encode()
            bodies.append((text, "application/json"))
        else:
            bodies.append((safetensors.encode({"w": grad}), SAFETENSORS))
    return bodies


# -- measurements ------------------------------------------------------------------------


def repeats_for(size: int) -> int:
    return max(5, min(200, int(2e7 // max(size, 1)) // 10))


class TorchAdam:
    """torch.optim.Adam on one float32 tensor, stepped in this process."""

    def __init__(self, size: int) -> None:
        import torch

        self.torch = torch
        self.param = torch.zeros(size, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.param], lr=1e-3)
        self.param.grad = torch.randn(size, dtype=torch.float32)

    def step_seconds(self) -> float:
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


def torch_reference(size: int) -> TorchAdam | None:
    try:
        return TorchAdam(size)
    except ImportError:
        return None


def http_step_ms(port: int, size: int, wire: str) -> tuple[float, float | None]:
    """Median HTTP round trip, then the median torch step measured right after it (so
    that both see the machine in the same state). Not interleaved step by step: torch's
    threads would then compete with the server still finishing its last request."""
    conn = Connection(port)
    try:
        sid = create_session(conn, size)
        path = f"/v1/sessions/{sid}/step"
        requests = [
            prepared_request(path, body, content_type, content_type)
            for body, content_type in step_bodies(size, wire)
        ]
        http_samples: list[float] = []
        for n in range(repeats_for(size) + 3):
            start = time.perf_counter()
            status, reply = conn.send_prepared(requests[n % len(requests)])
            elapsed = time.perf_counter() - start
            if status != 200:
                raise RuntimeError(f"step failed: {status} {reply[:300]!r}")
            if n >= 3:
                http_samples.append(elapsed)
        conn.request("DELETE", f"/v1/sessions/{sid}")
    finally:
        conn.close()
    reference = torch_reference(size)
    torch_ms = None
    if reference is not None:
        # torch's best of its default thread count and one thread: on a shared machine its
        # threads can wait on each other for tens of milliseconds.
        default_threads = reference.torch.get_num_threads()
        medians = []
        for threads in sorted({default_threads, 1}):
            reference.torch.set_num_threads(threads)
            samples = [reference.step_seconds() for _ in range(repeats_for(size) + 3)][3:]
            medians.append(statistics.median(samples) * 1e3)
        reference.torch.set_num_threads(default_threads)
        torch_ms = min(medians)
    return statistics.median(http_samples) * 1e3, torch_ms


def step_until(conn: Connection, sid: str, start_at: float, seconds: float) -> tuple[int, int]:
    """1k-param JSON steps of session ``sid`` from ``start_at`` for ``seconds`` (every
    client process starts together): how many answered 200, and how many did not."""
    path = f"/v1/sessions/{sid}/step"
    requests = [prepared_request(path, b, t, t) for b, t in step_bodies(1000, "json", 4)]
    while time.time() < start_at:
        time.sleep(0.001)
    done = failed = 0
    end = start_at + seconds
    while time.time() < end:
        status, _ = conn.send_prepared(requests[done % len(requests)])
        if status == 200:
            done += 1
        else:
            failed += 1
    conn.close()
    return done, failed


def _client(port: int, seconds: float, start_at: float, results: Any) -> None:
    conn = Connection(port)
    results.put(step_until(conn, create_session(conn, 1000), start_at, seconds))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(port: int, pid: int, clients: int, seconds: float) -> tuple[float, int, float]:
    """Steps per second, failed requests, and server CPU milliseconds per step."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0
    workers = [
        context.Process(target=_client, args=(port, seconds, start_at, results))
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = cpu_seconds(pid)
    totals = [results.get(timeout=seconds + 120) for _ in workers]
    cpu_used = cpu_seconds(pid) - cpu_before
    for worker in workers:
        worker.join()
    done = sum(t[0] for t in totals)
    failed = sum(t[1] for t in totals)
    return done / seconds, failed, cpu_used / max(done, 1) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7")
    parser.add_argument("--wires", default="safetensors,json")
    parser.add_argument("--storage", default="memory,disk")
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-access-log", action="store_true", help="serve without access logs")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    wires = [w for w in args.wires.split(",") if w]
    storages = [s for s in args.storage.split(",") if s]

    rows: list[tuple[int, str, str, float, float | None]] = []
    tput: dict[str, tuple[float, int, float]] = {}
    for storage in storages:
        with server(storage, access_log=not args.no_access_log) as (port, pid, _):
            for size in sizes:
                for wire in wires:
                    http_ms, torch_ms = http_step_ms(port, size, wire)
                    rows.append((size, wire, storage, http_ms, torch_ms))
                    print(
                        f"  {storage:6s} {wire:11s} {size:>10,d}: {http_ms:9.2f} ms",
                        file=sys.stderr,
                    )
            if args.throughput_seconds > 0:
                tput[storage] = throughput(port, pid, args.clients, args.throughput_seconds)

    print("\nAdam, one float32 tensor: median round trip per step (ms)\n")
    print(
        "| params | wire | storage | HTTP step (ms) "
        "| torch.optim in-process (ms, best of default threads and 1) | ratio |"
    )
    print("|---:|---|---|---:|---:|---:|")
    for size, wire, storage, ms, reference in rows:
        ref_text = f"{reference:.3f}" if reference is not None else "n/a"
        ratio = f"{ms / reference:.1f}x" if reference else "n/a"
        print(f"| {size:,d} | {wire} | {storage} | {ms:.2f} | {ref_text} | {ratio} |")
    if tput:
        print(f"\n{args.clients} concurrent clients, 1k-param Adam sessions, JSON bodies\n")
        print("| storage | steps/s | failed | server CPU per step (ms) |")
        print("|---|---:|---:|---:|")
        for storage, (rate, failed, cpu_ms) in tput.items():
            print(f"| {storage} | {rate:,.0f} | {failed} | {cpu_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
