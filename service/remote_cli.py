"""``optserve sessions ...``: list, show, export, import and delete sessions of a running
server over its HTTP API, as the clients do (``OPTSERVE_URL``, ``OPTSERVE_API_KEY``).

Every failure is one line on stderr and an exit code: 2 when the server cannot be
reached, 1 when it answers with a problem document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
SAFETENSORS = "application/vnd.optserve.safetensors"


class Failed(Exception):
    """What went wrong, as the one line to print, and the exit code."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.code = code


def add_parser(commands: Any) -> None:
    sessions = commands.add_parser(
        "sessions",
        help="list, show, export, import or delete sessions of a running server",
        description="Talk to a running server over HTTP, as the clients do.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sessions.add_argument(
        "--url",
        default=os.environ.get("OPTSERVE_URL") or DEFAULT_URL,
        help="the server (env OPTSERVE_URL)",
    )
    # the key's value never shows in --help: it is read from the environment in run()
    sessions.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="bearer key (default: env OPTSERVE_API_KEY; unset: an open server)",
    )
    actions = sessions.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="one line per session of this tenant: id, step, optimizer")
    show = actions.add_parser("show", help="print a session's document (JSON)")
    show.add_argument("session")
    export = actions.add_parser("export", help="save a session's checkpoint (safetensors)")
    export.add_argument("session")
    export.add_argument(
        "-o", "--output", type=Path, help="file to write (default: SESSION.safetensors)"
    )
    imported = actions.add_parser(
        "import", help="create a session from a checkpoint; prints the new id"
    )
    imported.add_argument("file", type=Path)
    delete = actions.add_parser("delete", help="delete sessions")
    delete.add_argument("session", nargs="+")


def _problem_line(response: httpx.Response) -> str:
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    title = problem.get("title") or response.reason_phrase
    detail = problem.get("detail")
    return f"{response.status_code} {title}" + (f": {detail}" if detail else "")


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise Failed(
            f"cannot reach {client.base_url}: {exc} (is the server running? set OPTSERVE_URL "
            "or --url)",
            2,
        ) from None
    if response.status_code >= 400:
        raise Failed(_problem_line(response), 1)
    return response


def _list(client: httpx.Client) -> None:
    after: str | None = None
    while True:
        params = {"limit": "100"} | ({"after": after} if after else {})
        page = _request(client, "GET", "/v1/sessions", params=params).json()
        for doc in page["sessions"]:
            optimizer = doc.get("optimizer", {}).get("name", "?")
            labels = ",".join(f"{k}={v}" for k, v in (doc.get("labels") or {}).items())
            print(f"{doc['id']}\tstep {doc['step']}\t{optimizer}\t{labels}".rstrip())
        after = page.get("next")
        if not after:
            return


def _run(args: argparse.Namespace, client: httpx.Client) -> None:
    if args.action == "list":
        _list(client)
    elif args.action == "show":
        document = _request(client, "GET", f"/v1/sessions/{args.session}").json()
        print(json.dumps(document, indent=2))
    elif args.action == "export":
        state = _request(client, "GET", f"/v1/sessions/{args.session}/state").content
        output: Path = args.output or Path(f"{args.session}.safetensors")
        output.write_bytes(state)
        print(f"wrote {output} ({len(state)} bytes)")
    elif args.action == "import":
        try:
            body = args.file.read_bytes()
        except OSError as exc:
            raise Failed(f"cannot read {args.file}: {exc.strerror}", 2) from None
        headers = {"Content-Type": SAFETENSORS}
        created = _request(client, "POST", "/v1/sessions", content=body, headers=headers)
        document = created.json()
        print(f"{document['id']}\tstep {document['step']}")
    elif args.action == "delete":
        for session in args.session:
            _request(client, "DELETE", f"/v1/sessions/{session}")
            print(f"deleted {session}")


def run(args: argparse.Namespace) -> int:
    key = getattr(args, "api_key", None) or os.environ.get("OPTSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=60) as client:
            _run(args, client)
    except Failed as failure:
        print(f"optserve: {failure}", file=sys.stderr)
        return failure.code
    return 0
