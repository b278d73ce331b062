"""The ``optserve`` command (``python -m service`` is the same).

- ``optserve serve``: run the HTTP server;
- ``optserve check``: read every stored session back, report what is damaged;
- ``optserve repair SESSION --to-step N``: rebuild a session as it was after N steps.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service.api.auth import KeyFileError, KeyTable
from service.config import Settings

if TYPE_CHECKING:
    from service.sessions.integrity import Report


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
    check = commands.add_parser(
        "check",
        help="verify every stored session (the server must be stopped)",
        description="Read every session of the data directory back: every snapshot, every "
        "log record, replayed to the end. Prints one line per session and exits 1 if "
        "anything is damaged.",
    )
    check.add_argument("--data-dir", type=Path, help="the server's data directory")
    repair = commands.add_parser(
        "repair",
        help="rebuild a session as it was after N steps (the server must be stopped)",
        description="Bring SESSION back to the state after exactly N steps, from intact "
        "snapshots and log records; what comes after is dropped, and the old files are "
        "moved to quarantine/ in the data directory.",
    )
    repair.add_argument("session", help="the session id")
    repair.add_argument("--to-step", type=int, required=True, metavar="N")
    repair.add_argument("--data-dir", type=Path, help="the server's data directory")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = ("host", "port", "data_dir", "storage", "database_url", "insecure", "log_level")
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in names}
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


def _log_numerics() -> None:
    """One JSON line with what numpy and BLAS run with: replicas replay each other's
    sessions, and replays agree to the bit only where these agree (docs/storage.md,
    "Replays across machines"); ``replica_environment`` says whether the pinned one is set."""
    import logging

    from service.core import machine

    logging.getLogger("optserve.numerics").info("numerics", extra=machine.describe())


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
    if settings.storage == "postgres":
        problem = check_database(settings.database_url)
        if problem is not None:
            print(f"optserve: {problem}", file=sys.stderr)
            return 1
    logs.configure(settings.log_level)
    _log_numerics()
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


def _ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def _describe(report: Report) -> list[str]:
    where = "" if report.last_step is None else f" at step {report.last_step}"
    tenant = f" (tenant {report.tenant})" if report.tenant is not None else ""
    if report.damage is None:
        lines = [f"{report.session_id}{tenant}: ok{where}"]
    else:
        good = (
            "no state reads back"
            if report.last_step is None
            else (f"last good step {report.last_step}")
        )
        lines = [
            f"{report.session_id}{tenant}: DAMAGED, {good}: {report.damage}",
            f"  repair can rebuild steps: {_ranges(report.rebuildable())}",
        ]
    lines += [f"  damaged file (not needed): {problem}" for problem in report.problems]
    return lines


def _in_use(data_dir: Path) -> str:
    return (
        f"optserve: {data_dir} is in use by a running optserve server; stop it first "
        "(check and repair need the data directory to themselves)"
    )


def run_check(data_dir: Path) -> int:
    from service.sessions import integrity
    from service.sessions.store.disk import DataDirInUse

    if not data_dir.is_dir():
        print(f"optserve: no data directory at {data_dir}", file=sys.stderr)
        return 2
    try:
        reports = integrity.check(data_dir)
    except DataDirInUse:
        print(_in_use(data_dir), file=sys.stderr)
        return 2
    for report in reports:
        print("\n".join(_describe(report)))
    bad = [r for r in reports if not r.ok]
    print(f"{len(reports)} sessions, {len(bad)} with damage")
    return 1 if bad else 0


def run_repair(data_dir: Path, session_id: str, to_step: int) -> int:
    from service.sessions import integrity
    from service.sessions.store.disk import DataDirInUse

    if not data_dir.is_dir():
        print(f"optserve: no data directory at {data_dir}", file=sys.stderr)
        return 2
    try:
        report, aside = integrity.repair(data_dir, session_id, to_step)
    except DataDirInUse:
        print(_in_use(data_dir), file=sys.stderr)
        return 2
    except integrity.RepairRefused as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        return 1
    print(f"the old files of {session_id} are in {aside}")
    print("\n".join(_describe(report)))
    return 0 if report.damage is None else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"optserve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    if args.command == "check":
        return run_check(settings.data_dir)
    if args.command == "repair":
        return run_repair(settings.data_dir, args.session, args.to_step)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
