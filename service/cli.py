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
        "--storage",
        choices=("disk", "memory", "postgres"),
        help="'disk' (default), 'postgres' (with --database-url; shared by replicas), "
        "or 'memory' (keeps nothing across restarts)",
    )
    serve.add_argument(
        "--database-url", help="PostgreSQL URL for --storage postgres (postgresql://...)"
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
        "database_url": args.database_url,
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


def check_database(url: str) -> str | None:
    """Why the PostgreSQL store cannot start (one line), or None: checked before serving,
    so that an unreachable database is a clear message rather than a failed startup."""
    try:
        from service.sessions.store.postgres import check_reachable
    except ImportError:
        return "storage 'postgres' needs the postgres extra: pip install 'optserve[postgres]'"
    return check_reachable(url)


def serve(settings: Settings) -> int:
    import uvicorn

    from service.api import logs
    from service.api.app import create_app
    from service.api.server import http_protocol

    try:
        keys = KeyTable.from_settings(settings.api_keys, settings.api_keys_file)
    except KeyFileError as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        return 2
    refusal = check_exposure(settings, keys)
    if refusal is not None:
        print(f"optserve: {refusal}", file=sys.stderr)
        return 2
    if settings.storage == "postgres":
        problem = check_database(settings.database_url)
        if problem is not None:
            print(f"optserve: {problem}", file=sys.stderr)
            return 1
    logs.configure(settings.log_level)
    uvicorn.run(
        create_app(settings),
        http=http_protocol(),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # the app logs each request itself, with its request id
        server_header=False,
        proxy_headers=False,  # nothing here reads the client address; skip the rewrite
        timeout_keep_alive=30,
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
