"""Reading the JSON documents the server answers with (lists, catalogs, previews)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from optserve_client import _calls
from optserve_client._wire import load_json
from optserve_client.errors import ProtocolError


def json_body(response: httpx.Response) -> Any:
    """The parsed JSON of a response (any JSON value)."""
    try:
        return json.loads(response.content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{response.request.url}: reply is not JSON: {exc}") from None


def session_document(response: httpx.Response) -> dict[str, Any]:
    return load_json(response.content)


def session_page(response: httpx.Response) -> tuple[list[dict[str, Any]], str | None]:
    """One page of ``GET /v1/sessions``: the documents and the cursor of the next page."""
    body = json_body(response)
    if isinstance(body, list):
        return [d for d in body if isinstance(d, dict)], None
    if not isinstance(body, dict):
        raise ProtocolError("session list is neither an object nor a list")
    items = _first(body, "sessions", "items", "data")
    if not isinstance(items, list):
        raise ProtocolError("session list carries no list of sessions")
    cursor = _first(body, "next", "next_cursor", "cursor")
    return [d for d in items if isinstance(d, dict)], (str(cursor) if cursor else None)


class SessionPages:
    """``GET /v1/sessions`` page by page: the call for each next page, until the last."""

    def __init__(self, page_size: int | None) -> None:
        self.page_size = page_size
        self.after: str | None = None
        self.done = False

    def next_call(self) -> _calls.Call | None:
        return None if self.done else _calls.list_page(self.page_size, self.after)

    def read(self, response: httpx.Response) -> list[dict[str, Any]]:
        page, self.after = session_page(response)
        self.done = self.after is None
        return page


def catalog(response: httpx.Response, key: str) -> list[dict[str, Any]]:
    """``GET /v1/optimizers`` or ``/v1/schedules``: one entry per name, with its arguments."""
    body = json_body(response)
    if isinstance(body, dict):
        body = body.get(key, body.get("items"))
    if not isinstance(body, list):
        raise ProtocolError(f"{key} catalog is not a list")
    return [e for e in body if isinstance(e, dict)]


def preview(response: httpx.Response) -> list[list[float]]:
    """``POST /v1/schedules/preview``: the lr of each group at each step."""
    body = json_body(response)
    if isinstance(body, dict):
        body = _first(body, "lr", "lrs", "schedule")
    if not isinstance(body, list):
        raise ProtocolError("preview carries no list of learning rates")
    try:
        return [[float(x) for x in row] for row in body]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed preview: {exc}") from None


def _first(body: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in body:
            return body[key]
    return None
