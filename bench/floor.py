"""A user's step against its floor: the official client next to the least the same work costs.

    python bench/floor.py [--sizes 1e3,1e5,1e6,1e7] [--wires safetensors,json]
                          [--storages disk,memory] [--repeats N] [--rate-seconds 5]
                          [--rate-rounds 3] [--clients 4]

Two tables, each measured side by side in one run so that both columns see the same
machine (on a shared machine rerun it; compare ratios, not absolute figures):

1. **Large steps.** A server (``python -m service serve``, access log on: the defaults a
   user runs) on each of ``--storages`` in turn, the durable default (disk) first, and a
   raw TCP echo server (``bench/tcp_echo.py``) run as subprocesses on free loopback
   ports. For each size and wire, one Adam session over one float32 tensor holding no
   parameters is stepped with the official client's ``Session.step`` (httpx underneath,
   deltas returned). Interleaved with each step:

   - the TCP floor: the step's request bytes up and its reply bytes down through the echo
     server (what any server must pay to move the bytes: kernel copies and wake-ups);
   - torch's in-process ``Adam.step`` on a tensor of the same size (best of torch's
     default thread count and one thread, measured in this process; its OpenMP threads
     spin for only 10,000 iterations after a step, ``GOMP_SPINCOUNT``, so that they do
     not run on into the client's next step);
   - on the disk server, the disk: the step's request bytes written with ``O_DIRECT``
     over blocks already written, in a file in the server's data directory, then
     ``fdatasync``: the least it costs to make those bytes durable on this disk
     (``disk write``; appending to new blocks, as a log does, costs more).

   JSON rows stop at ``--json-max`` (100k: a 1M JSON step takes about a second of
   float formatting and parsing, which no transport change moves).

   ``floor`` is TCP + torch; ``ratio`` is client over floor (medians). On the disk server
   one more thing is measured with each step: torch's step with the disk write running
   beside it on a second thread (``torch + disk``), what this machine charges for
   computing and syncing at once (a durable server can sync while it computes, but not
   before it has the bytes). ``durable floor`` is TCP + that, and the ``ratio`` beside it
   is the client over that. On a machine whose disk writes cost no CPU it would be the
   larger of the two; on the 2-core development VM the write slows the computation
   beside it (docs/storage.md, "What a durable write costs here"). ``server peak RSS``
   is the server's high-water resident memory while stepping that size (``VmHWM`` reset
   through ``/proc/PID/clear_refs`` before the size),
   ``over idle`` the part above its resident memory before it; ``disk/step`` is how much
   the data directory grew per step.

2. **Small durable steps.** ``--clients`` processes each step their own 1k-parameter
   session with JSON bodies over raw keep-alive sockets, as fast as the server answers,
   for ``--rate-seconds``; then the same clients post the same bodies to a bare FastAPI
   route (``bench/floor.py --bare-echo``: same uvicorn protocol, parses the JSON and
   answers a document of the same shape). The two alternate ``--rate-rounds`` times;
   the table has the median of each and their ratio.

Linux only (``/proc``); torch (``pip install torch==2.13.0``) for the torch column.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch's OpenMP threads (libgomp) spin for ~300,000 iterations after each parallel
# region before they sleep: after a 1M Adam step about 9 ms of CPU, on the two cores the
# client's step measured next needs (it took 2-2.5 ms longer right after torch's step than
# after an echo). 10,000 iterations still bridge the gaps between the regions within
# torch's step, whose time is unchanged (1.6-1.7 ms either way), and burn 0.3 ms after it.
# Read once, when torch starts its threads: set before anything imports torch.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np
from fastapi import FastAPI, Request
from starlette.responses import Response

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

from bench.http_step import (  # noqa: E402
    Connection,
    TorchAdam,
    create_session,
    free_port,
    prepared_request,
    server,
    serving,
    step_until,
    torch_reference,
)
from bench.tcp_echo import EchoServer  # noqa: E402
from tests.e2e.server_process import memory  # noqa: E402


@dataclass
class Server:
    port: int
    pid: int
    data_dir: Path


@contextmanager
def step_server(storage: str) -> Iterator[Server]:
    """``python -m service serve`` on ``storage`` in a fresh data directory, access log on."""
    with server(storage, access_log=True) as (port, pid, data):
        yield Server(port, pid, data)


@contextmanager
def bare_echo_server() -> Iterator[int]:
    """This file's ``--bare-echo`` mode in a subprocess: the bare FastAPI route."""
    port = free_port()
    with serving([sys.executable, str(Path(__file__).resolve()), "--bare-echo", str(port)], port):
        yield port


def serve_bare_echo(port: int) -> None:
    """A FastAPI app with one route that parses a JSON step body and answers a document of
    the same shape (step, lr, applied, deltas of the same length), on the same uvicorn
    protocol as the service: what any JSON route on this stack costs."""
    import uvicorn

    from service.api.server import http_protocol

    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"ok")

    @app.post("/v1/sessions/{session_id}/step")
    async def step(request: Request) -> Response:
        document = json.loads(await request.body())
        grads = {
            name: np.asarray(values, dtype=np.float64) for name, values in document["grads"].items()
        }
        reply = {
            "step": 1,
            "lr": [1e-3],
            "applied": True,
            "deltas": {n: g.tolist() for n, g in grads.items()},
        }
        return Response(json.dumps(reply).encode(), media_type="application/json")

    uvicorn.run(
        app,
        http=http_protocol(None),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
    )


# -- the server's memory and disk ---------------------------------------------------------


def reset_peak_rss(pid: int) -> bool:
    """Restart ``VmHWM`` from the current RSS (Linux >= 4.0; False where refused)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- large steps ------------------------------------------------------------------------


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


@dataclass
class Row:
    storage: str
    size: int
    wire: str
    client_ms: float
    tcp_ms: float
    torch_ms: float | None
    disk_ms: float | None
    """The disk's own durable write of the request's bytes (a durable server's rows)."""
    beside_ms: float | None
    """torch's step with that write running beside it (a durable server's rows)."""
    peak_rss_mib: float
    over_idle_mib: float
    disk_per_step: float

    @property
    def floor_ms(self) -> float:
        return self.tcp_ms + (self.torch_ms or 0.0)

    @property
    def durable_floor_ms(self) -> float:
        if self.beside_ms is not None:
            return self.tcp_ms + self.beside_ms
        return self.tcp_ms + max(self.torch_ms or 0.0, self.disk_ms or 0.0)


class DiskWrite:
    """``nbytes`` written with ``O_DIRECT`` over blocks written before, then ``fdatasync``:
    the cheapest durable write of that many bytes in ``directory``'s file system."""

    def __init__(self, directory: Path, nbytes: int) -> None:
        self.path = directory / "floor-probe.bin"
        size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.buffer = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        self.buffer.write(np.random.default_rng(0).bytes(size))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.pwrite(self.fd, self.buffer, 0)  # the blocks exist and are written: no metadata
        os.fsync(self.fd)

    def seconds(self) -> float:
        start = time.perf_counter()
        os.pwrite(self.fd, self.buffer, 0)
        os.fdatasync(self.fd)
        return time.perf_counter() - start

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()
        self.buffer.close()


def repeats_for(size: int, override: int | None) -> int:
    if override:
        return override
    # At least 25: a median of 7 moved by a millisecond from run to run at 1M.
    return max(25, min(200, int(2e6 // max(size, 1))))


def large_steps(
    server: Server, durable: bool, echo: EchoServer, size: int, wire: str, repeats: int
) -> Row:
    from optserve_client import Client

    rng = np.random.default_rng(size)
    grads = [rng.standard_normal(size, dtype=np.float32) for _ in range(2)]
    reference = torch_reference(size)
    echo_client = echo.client()
    with Client(f"http://127.0.0.1:{server.port}", wire=wire) as client:  # type: ignore[arg-type]
        session = client.create_session({"name": "Adam", "lr": 1e-3}, {"w": (size,)})
        # The bytes the echo moves: this step's own request and reply bodies.
        request_bytes, reply_bytes = _step_sizes(server.port, session.id, grads[0], wire)
        for g in grads:
            session.step(g)  # warm-up: connection, allocator, caches
        idle = memory(server.pid)["VmRSS"]
        if not reset_peak_rss(server.pid):
            print("  (cannot reset VmHWM: peak RSS is since start)", file=sys.stderr)
        disk = DiskWrite(server.data_dir, request_bytes) if durable else None
        disk_before = disk_bytes(server.data_dir)
        client_s: list[float] = []
        tcp_s: list[float] = []
        torch_s: list[float] = []
        disk_s: list[float] = []
        beside_s: list[float] = []
        for n in range(repeats):
            start = time.perf_counter()
            session.step(grads[n % 2])
            client_s.append(time.perf_counter() - start)
            tcp_s.append(echo_client.round_trip(request_bytes, reply_bytes))
            if disk is not None:
                disk_s.append(disk.seconds())
            if reference is not None:
                torch_s.append(_torch_best(reference))
                if disk is not None:
                    beside_s.append(_torch_best(reference, beside=disk.seconds))
        peak = memory(server.pid)["VmHWM"]
        disk_after = disk_bytes(server.data_dir)
        session.delete()
    echo_client.close()
    if disk is not None:
        disk.close()
    return Row(
        "disk" if durable else "memory",
        size,
        wire,
        _median_ms(client_s),
        _median_ms(tcp_s),
        _median_ms(torch_s) if torch_s else None,
        _median_ms(disk_s) if disk_s else None,
        _median_ms(beside_s) if beside_s else None,
        peak / 2**20,
        (peak - idle) / 2**20,
        (disk_after - disk_before) / repeats,
    )


def _step_sizes(port: int, session_id: str, grad: np.ndarray, wire: str) -> tuple[int, int]:
    """Request and reply bytes of one step, the reply measured by sending it (the
    step changes nothing the table reads)."""
    from optserve_client._wire import media_type, step_body

    parts = step_body(wire, {"w": grad}, None, None)  # type: ignore[arg-type]
    body = parts if isinstance(parts, bytes) else b"".join(parts)
    kind = media_type(wire)  # type: ignore[arg-type]
    conn = Connection(port)
    path = f"/v1/sessions/{session_id}/step"
    status, reply = conn.send_prepared(prepared_request(path, body, kind, kind))
    conn.close()
    if status != 200:
        raise RuntimeError(f"step failed: {status} {reply[:300]!r}")
    return len(body), len(reply)


_BESIDE = ThreadPoolExecutor(1, thread_name_prefix="floor-disk")
"""Runs the disk write beside torch's step (``_torch_best(beside=...)``)."""


def _step_beside(reference: TorchAdam, beside: Callable[[], float]) -> float:
    """Seconds from starting ``beside`` on another thread until both it and one torch step
    are over: the two at once."""
    start = time.perf_counter()
    pending = _BESIDE.submit(beside)
    reference.step_seconds()
    pending.result()
    return time.perf_counter() - start


def _torch_best(reference: TorchAdam, beside: Callable[[], float] | None = None) -> float:
    """One torch step at its default thread count and one at one thread; the faster (on a
    shared machine torch's threads can wait on each other for milliseconds). With
    ``beside``, each of the two is :func:`_step_beside`."""
    once = (
        reference.step_seconds
        if beside is None
        else functools.partial(_step_beside, reference, beside)
    )
    default = reference.torch.get_num_threads()
    first = once()
    reference.torch.set_num_threads(1)
    second = once()
    reference.torch.set_num_threads(default)
    return min(first, second)


# -- small durable steps ----------------------------------------------------------------


def _rate_client(port: int, create: bool, seconds: float, start_at: float, results: Any) -> None:
    conn = Connection(port)
    sid = create_session(conn, 1000) if create else "bare"
    results.put(step_until(conn, sid, start_at, seconds))


def step_rate(port: int, durable: bool, clients: int, seconds: float) -> tuple[float, int]:
    """Steps per second of ``clients`` processes together, and failed requests."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0
    workers = [
        context.Process(target=_rate_client, args=(port, durable, seconds, start_at, results))
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    totals = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(t[0] for t in totals) / seconds, sum(t[1] for t in totals)


# -- report -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1e3,1e5,1e6,1e7")
    parser.add_argument("--wires", default="safetensors,json")
    parser.add_argument("--storages", default="disk,memory")
    parser.add_argument("--json-max", type=float, default=1e5, help="largest size sent as JSON")
    parser.add_argument("--repeats", type=int, default=0, help="steps per row (default by size)")
    parser.add_argument("--rate-seconds", type=float, default=5.0)
    parser.add_argument("--rate-rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--bare-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_echo:
        serve_bare_echo(args.bare_echo)
        return 0
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    wires = [w for w in args.wires.split(",") if w]
    storages = [w for w in args.storages.split(",") if w]

    rows: list[Row] = []
    rates: dict[str, list[float]] = {"optserve": [], "bare": []}
    failures = 0
    for storage in storages:
        durable = storage == "disk"
        with step_server(storage) as server:
            echo = EchoServer(free_port())
            try:
                for size in sizes:
                    for wire in wires:
                        if wire == "json" and size > args.json_max:
                            continue
                        repeats = repeats_for(size, args.repeats)
                        row = large_steps(server, durable, echo, size, wire, repeats)
                        rows.append(row)
                        print(
                            f"  {storage:6s} {wire:11s} {size:>10,d}: {row.client_ms:9.2f} ms",
                            file=sys.stderr,
                        )
            finally:
                echo.stop()
            if durable and args.rate_seconds > 0:
                with bare_echo_server() as bare_port:
                    for _ in range(args.rate_rounds):
                        for name, port, is_ours in (
                            ("optserve", server.port, True),
                            ("bare", bare_port, False),
                        ):
                            rate, failed = step_rate(port, is_ours, args.clients, args.rate_seconds)
                            rates[name].append(rate)
                            failures += failed

    print("\nAdam, one float32 tensor, session holding no params\n")
    print(
        "| storage | params | wire | official client (ms) | TCP echo (ms) | torch step (ms) "
        "| floor (ms) | ratio | disk write (ms) | torch + disk (ms) | durable floor (ms) | ratio "
        "| server peak RSS (MiB) | over idle (MiB) | disk/step (MB) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        torch_text = f"{r.torch_ms:.3f}" if r.torch_ms is not None else "n/a"
        disk_text = f"{r.disk_ms:.2f}" if r.disk_ms is not None else "-"
        beside_text = f"{r.beside_ms:.2f}" if r.beside_ms is not None else "-"
        print(
            f"| {r.storage} | {r.size:,d} | {r.wire} | {r.client_ms:.2f} | {r.tcp_ms:.2f} "
            f"| {torch_text} "
            f"| {r.floor_ms:.2f} | {r.client_ms / r.floor_ms:.2f}x | {disk_text} | {beside_text} "
            f"| {r.durable_floor_ms:.2f} | {r.client_ms / r.durable_floor_ms:.2f}x "
            f"| {r.peak_rss_mib:.0f} | {r.over_idle_mib:.0f} | {r.disk_per_step / 1e6:.3f} |"
        )
    if rates["optserve"]:
        ours, bare = statistics.median(rates["optserve"]), statistics.median(rates["bare"])
        print(
            f"\n{args.clients} client processes, 1k-param JSON steps "
            f"(median of {args.rate_rounds} alternating {args.rate_seconds:g} s rounds)\n"
        )
        print("| server | steps/s |")
        print("|---|---:|")
        print(f"| optserve, durable (disk) | {ours:,.0f} |")
        print(f"| bare FastAPI JSON echo | {bare:,.0f} |")
        print(f"| ratio | {ours / bare:.2f}x |" if bare else "| ratio | n/a |")
        if failures:
            print(f"\n{failures} requests failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
