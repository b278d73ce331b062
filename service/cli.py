"""``optserve serve``: run the HTTP server (``python -m service serve`` is the same)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.api.auth import KeyFileError, KeyTable
from service.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve",
        description="optserve: torch.optim optimizers and schedules as a stateful REST service",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the server. Every option also reads from OPTSERVE_* variables; "
        "flags win over the environment.",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--data-dir", type=Path, help="where sessions are stored durably")
    serve.add_argument(
        "--storage", choices=("disk", "memory"), help="'memory' keeps nothing across restarts"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address with no API keys configured",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "storage": args.storage,
        "insecure": args.insecure,
        "log_level": args.log_level,
    }
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def check_exposure(settings: Settings, keys: KeyTable) -> str | None:
    """Why the server must not start as configured, or None."""
    if keys.open and not settings.insecure and not settings.binds_loopback_only():
        return (
            f"refusing to serve {settings.host} without API keys: anyone who can reach it "
            "could use every session. Set OPTSERVE_API_KEYS (or OPTSERVE_API_KEYS_FILE), "
            "or pass --insecure if that is really intended."
        )
    return None


def serve(settings: Settings) -> int:
    import uvicorn

    from service.api import logs
    from service.api.app import create_app
    from service.api.server import ConnectionGuards, http_protocol

    try:
        keys = KeyTable.from_settings(settings.api_keys, settings.api_keys_file)
    except KeyFileError as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        return 2
    refusal = check_exposure(settings, keys)
    if refusal is not None:
        print(f"optserve: {refusal}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    guards = ConnectionGuards(settings.header_timeout_s, settings.max_idle_connections)
    uvicorn.run(
        create_app(settings),
        http=http_protocol(guards),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # the app logs each request itself, with its request id
        server_header=False,
        proxy_headers=False,  # nothing here reads the client address; skip the rewrite
        timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"optserve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
