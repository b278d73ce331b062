"""Building responses: JSON documents, session documents with their ETag, tensor bodies."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

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


def session_response(info: SessionInfo, status_code: int = 200, location: bool = False) -> Response:
    headers = {"ETag": info.etag}
    if location:
        headers["Location"] = f"/v1/sessions/{info.id}"
    return json_response(info.document(), status_code, headers)
