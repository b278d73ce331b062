"""Building responses: JSON documents, session documents with their ETag, tensor bodies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.api.media import JSON_TYPE, SAFETENSORS_TYPE
from service.codec import strict_json
from service.sessions.models import SessionInfo


def json_response(
    document: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    # Non-finite floats (a norm_type of inf) are written "inf", "-inf", "nan", which every
    # JSON parser reads and the create body accepts back.
    body = strict_json.dumps(document).encode()
    return Response(body, status_code=status_code, headers=headers, media_type=JSON_TYPE)


def raw_json_response(body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, headers=headers, media_type=JSON_TYPE)


def safetensors_response(body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, headers=headers, media_type=SAFETENSORS_TYPE)


class PartsResponse(Response):
    """A body sent as the buffers it is made of, each its own ASGI body message, so a
    reply of megabytes of tensors is never joined into one ``bytes``.

    ASGI asks for ``bytes`` bodies; this hands uvicorn memoryviews, which its transports
    write as they write bytes (``transport.write`` takes any buffer). An ASGI server that
    insists on ``bytes`` would need :func:`safetensors_response` of the joined body.
    """

    def __init__(
        self,
        parts: Sequence[bytes | memoryview],
        headers: Mapping[str, str] | None,
        media_type: str,
    ) -> None:
        self.parts = [p for p in parts if len(p)]
        length = sum(memoryview(p).nbytes for p in self.parts)
        # An explicit Content-Length keeps Starlette from counting the empty ``body``.
        super().__init__(
            b"", headers={**(headers or {}), "content-length": str(length)}, media_type=media_type
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self.parts) - 1
        for n, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": n < last})
        if not self.parts:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def safetensors_parts_response(
    parts: Sequence[bytes | memoryview], headers: dict[str, str] | None = None
) -> Response:
    return PartsResponse(parts, headers, SAFETENSORS_TYPE)


def session_response(info: SessionInfo, status_code: int = 200, location: bool = False) -> Response:
    headers = {"ETag": info.etag}
    if location:
        headers["Location"] = f"/v1/sessions/{info.id}"
    return json_response(info.document(), status_code, headers)
