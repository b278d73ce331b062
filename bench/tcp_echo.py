"""The floor under a step's round trip: the same bytes each way over loopback TCP, no HTTP.

    python -m bench.tcp_echo --port PORT     # the echo server (bench/replicas.py starts it)

The client sends a 16-byte header (bytes that follow, bytes wanted back) and the request
bytes; the server reads them all, then answers that many bytes. Both ends use raw
sockets with ``TCP_NODELAY`` and reusable buffers, so what is left is the kernel's copy
and the two processes' wake-ups: what any server on this machine must pay to take a
step's body in and send its reply out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HEADER = struct.Struct("<QQ")
ROOT = Path(__file__).resolve().parents[1]


def _read_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    while view:
        got = sock.recv_into(view)
        if got == 0:
            return False
        view = view[got:]
    return True


def _serve_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(HEADER.size)
    buffer = bytearray()
    with conn:
        while _read_into(conn, memoryview(header)):
            incoming, outgoing = HEADER.unpack(header)
            if len(buffer) < max(incoming, outgoing):
                buffer = bytearray(max(incoming, outgoing))
            if not _read_into(conn, memoryview(buffer)[:incoming]):
                return
            conn.sendall(memoryview(buffer)[:outgoing])


def serve(port: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


class EchoServer:
    """``python -m bench.tcp_echo`` in a subprocess (its own process, as a server is),
    stopped by its PID."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.tcp_echo", "--port", str(port)], cwd=ROOT
        )

    def client(self) -> EchoClient:
        deadline = time.monotonic() + 30
        while True:
            try:
                return EchoClient(self.port)
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=10)


class EchoClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_buffer = bytearray()
        self.receive_buffer = bytearray()

    def round_trip(self, request_bytes: int, reply_bytes: int) -> float:
        """Seconds to send ``request_bytes`` and read ``reply_bytes`` back."""
        if len(self.send_buffer) < request_bytes:
            self.send_buffer = bytearray(os.urandom(request_bytes))
        if len(self.receive_buffer) < reply_bytes:
            self.receive_buffer = bytearray(reply_bytes)
        start = time.perf_counter()
        self.sock.sendall(HEADER.pack(request_bytes, reply_bytes))
        self.sock.sendall(memoryview(self.send_buffer)[:request_bytes])
        if not _read_into(self.sock, memoryview(self.receive_buffer)[:reply_bytes]):
            raise ConnectionError("the echo server closed the connection")
        return time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    serve(parser.parse_args().port)


if __name__ == "__main__":
    main()
