"""Reading request bodies: the media type first (415), then the bytes (413 while streaming)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from service.api.media import Wire, request_wire
from service.api.wire import parse_json_object


async def read_body(request: Request) -> bytes:
    # The limit is counted by the RequestContext middleware as the chunks arrive.
    return await request.body()


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
