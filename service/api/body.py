"""Reading request bodies: the media type first (415), then the bytes (413 while streaming).

A body is read chunk by chunk with a timeout on each wait: a client that stops sending
mid-body gets 408 and loses its connection after ``body_timeout_s``, instead of holding its
buffer forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from service.api.media import Wire, request_wire, require_json_answer
from service.api.problems import BodyTimeout, BodyTooLarge
from service.api.wire import parse_json_object
from service.config import Settings


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def read_body(request: Request, limit: int | None = None, why: str = "") -> bytes:
    """The whole body. ``limit`` is a step's own bound (``step_body_bytes``, explained by
    ``why``): past it, declared or received, the request is 413 at once. The server-wide
    ``max_body_bytes`` is counted by the RequestContext middleware as the chunks arrive."""
    if limit is not None:
        declared = _declared_length(request)
        if declared is not None and declared > limit:
            raise BodyTooLarge(limit, "step_body_bytes", why)
    settings: Settings = request.app.state.settings
    wait = settings.body_timeout_s
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    size = 0
    deadline = asyncio.timeout_at(loop.time() + wait)
    try:
        async with deadline:
            async for chunk in request.stream():
                deadline.reschedule(loop.time() + wait)
                if not chunk:
                    continue
                size += len(chunk)
                if limit is not None and size > limit:
                    raise BodyTooLarge(limit, "step_body_bytes", why)
                chunks.append(chunk)
    except TimeoutError:
        if deadline.expired():
            raise BodyTimeout(wait) from None
        raise
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


async def tensor_body(request: Request) -> tuple[Wire, bytes]:
    """A JSON or safetensors body, for a route that answers in JSON: its wire and bytes.

    Checks run in the order clients see them: the body's type (415), the answer's (406),
    then the size while reading (413).
    """
    wire = request_wire(request)
    require_json_answer(request)
    return wire, await read_body(request)


async def json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """A JSON object body; with ``optional``, an empty body (any or no type) reads as ``{}``."""
    if optional:
        body = await read_body(request)
        if not body:
            return {}
        request_wire(request, (Wire.JSON,))
    else:
        request_wire(request, (Wire.JSON,))
        body = await read_body(request)
    return parse_json_object(body)
