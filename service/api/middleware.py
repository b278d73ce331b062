"""One pure-ASGI middleware for what every request needs: an id, a body limit, metrics, a log.

Pure ASGI (no ``BaseHTTPMiddleware``) because it sits on the hot path of every step: it
adds a few microseconds, not a task and a queue per request.

The body limit is enforced twice: a declared ``Content-Length`` over the limit is refused
before any byte is read, and the bytes actually received are counted as they stream in, so
a chunked body or a lying ``Content-Length`` is cut off at the limit too (413). The bytes
received are also held against the server-wide :class:`BodyBudget` until the request ends.
The request's :class:`BodyAccount` is in ``scope["state"]`` (:data:`BODY_ACCOUNT`) for a
body received in place, which the messages do not carry.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import errors
from service.api.inflight import BODY_ACCOUNT, BodyAccount, BodyBudget
from service.api.metrics import Metrics
from service.api.problems import BodyTooLarge

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

access = logging.getLogger("optserve.access")


def _new_request_id() -> str:
    # Unique enough to follow a request through the logs; no syscall on the hot path.
    return f"{random.getrandbits(64):016x}"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        access_log: bool,
        budget: BodyBudget,
    ):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            # "/v1/sessions/" is "/v1/sessions": the router would answer an empty 307, which
            # a client that does not follow redirects (curl, most POSTs) gets as no answer.
            raw: bytes = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": raw.rstrip(b"/")}
        started = time.perf_counter()
        given = _header(scope, REQUEST_ID_HEADER)
        request_id = (
            given.decode() if given and _VALID_REQUEST_ID.fullmatch(given) else _new_request_id()
        )
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        encoded_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, encoded_id)]
            await send(message)

        limit = self.max_body_bytes
        account = BodyAccount(limit, self.budget)
        scope["state"][BODY_ACCOUNT] = account

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                await account.add(len(message.get("body", b"")))
            return message

        try:
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                response = errors.render(BodyTooLarge(limit), Request(scope))
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            account.close()
            self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, elapsed: float, request_id: str) -> None:
        route: Any = scope.get("route")
        template = getattr(route, "path", None) or "(unmatched)"
        method = scope["method"]
        self.metrics.request(template, method, status, elapsed)
        if self.access_log and access.isEnabledFor(logging.INFO):
            access.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "ms": round(elapsed * 1000, 3),
                    "tenant": scope["state"].get("tenant"),
                },
            )
