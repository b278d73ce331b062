"""The ``optserve`` command (``python -m service`` is the same).

- ``optserve serve``: run the HTTP server;
- ``optserve check``: read every stored session back, report what is damaged;
- ``optserve repair SESSION --to-step N``: rebuild a session as it was after N steps;
- ``optserve sessions list|show|export|import|delete``: a running server's sessions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service import remote_cli
from service.api.auth import KeyFileError, KeyTable
from service.config import Settings

if TYPE_CHECKING:
    from service.sessions.integrity import Report


def _default(name: str) -> str:
    """Where a serve flag's value comes from when it is not given: for --help."""
    default = Settings.model_fields[name].default
    shown = "none" if default in (None, "") else str(default)
    return f"default: {shown}; env OPTSERVE_{name.upper()}"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("optserve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve",
        description="optserve: torch.optim optimizers and schedules as a stateful REST service",
    )
    parser.add_argument("--version", action="version", version=f"optserve {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the server. Every option also reads from OPTSERVE_* variables; "
        "flags win over the environment.",
    )
    serve.add_argument("--host", help=f"address to bind ({_default('host')})")
    serve.add_argument("--port", type=int, help=f"port to bind, 0: any free ({_default('port')})")
    serve.add_argument(
        "--data-dir",
        type=Path,
        help=f"where sessions are stored durably ({_default('data_dir')})",
    )
    serve.add_argument(
        "--storage",
        choices=("disk", "memory", "postgres"),
        help="'disk', 'postgres' (with --database-url; shared by replicas), "
        f"or 'memory' (keeps nothing across restarts) ({_default('storage')})",
    )
    serve.add_argument(
        "--database-url",
        help=f"PostgreSQL URL (postgresql://...) for --storage postgres "
        f"({_default('database_url')})",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help=f"allow a non-loopback address with no API keys configured ({_default('insecure')})",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help=f"({_default('log_level')})",
    )
    check = commands.add_parser(
        "check",
        help="verify every stored session (the server must be stopped)",
        description="Read every session of the data directory back: every snapshot, every "
        "log record, replayed to the end. Prints one line per session and exits 1 if "
        "anything is damaged.",
    )
    check.add_argument(
        "--data-dir", type=Path, help=f"the server's data directory ({_default('data_dir')})"
    )
    repair = commands.add_parser(
        "repair",
        help="rebuild a session as it was after N steps (the server must be stopped)",
        description="Bring SESSION back to the state after exactly N steps, from intact "
        "snapshots and log records; what comes after is dropped, and the old files are "
        "moved to quarantine/ in the data directory.",
    )
    repair.add_argument("session", help="the session id")
    repair.add_argument("--to-step", type=int, required=True, metavar="N")
    repair.add_argument(
        "--data-dir", type=Path, help=f"the server's data directory ({_default('data_dir')})"
    )
    remote_cli.add_parser(commands)
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
    from service.heap import keep_large_buffers

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
    if settings.storage == "disk":
        from service.sessions.store.disk import data_dir_in_use

        if data_dir_in_use(settings.data_dir):
            why = "two servers on one data directory would corrupt its sessions"
            print(_in_use(settings.data_dir.resolve(), why), file=sys.stderr)
            return 3
    logs.configure(settings.log_level)
    _log_start(settings)
    _log_numerics()
    guards = ConnectionGuards(settings.header_timeout_s, settings.max_idle_connections)
    keep_large_buffers()
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


def _log_start(settings: Settings) -> None:
    import logging

    url = f"http://{settings.host}:{settings.port}"
    where = f", data directory {settings.data_dir.resolve()}" if settings.storage == "disk" else ""
    logging.getLogger("optserve").info(
        f"starting optserve {_version()}: storage {settings.storage}{where}, serving {url}",
        extra={
            "storage": settings.storage,
            "data_dir": str(settings.data_dir.resolve()) if settings.storage == "disk" else None,
            "url": url,
        },
    )


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


def _in_use(
    data_dir: Path, why: str = "check and repair need the data directory to themselves"
) -> str:
    return f"optserve: {data_dir} is in use by a running optserve server; stop it first ({why})"


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
    if args.command == "sessions":
        return remote_cli.run(args)
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
