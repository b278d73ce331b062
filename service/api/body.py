"""Reading request bodies: the media type first (415), then the bytes (413 while streaming)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from service.api.media import Wire, request_wire, require_json_answer
from service.api.wire import parse_json_object


async def read_body(request: Request) -> bytes:
    # The limit is counted by the RequestContext middleware as the chunks arrive.
    return await request.body()


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
