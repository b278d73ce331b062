"""Media types: what a request body is (Content-Type) and what the answer should be (Accept).

Two wire formats, JSON and safetensors (``application/octet-stream`` is read as the
latter). A response follows ``Accept`` and, where ``Accept`` leaves the choice open,
the request's own type; problem documents are always JSON.
"""

from __future__ import annotations

from enum import Enum

from starlette.requests import Request

from service.api.problems import NotAcceptable, UnsupportedMediaType
from service.codec.safetensors import MEDIA_TYPE

JSON_TYPE = "application/json"
SAFETENSORS_TYPE = MEDIA_TYPE
OCTET_STREAM = "application/octet-stream"


class Wire(Enum):
    JSON = JSON_TYPE
    SAFETENSORS = SAFETENSORS_TYPE


_BY_TYPE = {
    JSON_TYPE: Wire.JSON,
    SAFETENSORS_TYPE: Wire.SAFETENSORS,
    OCTET_STREAM: Wire.SAFETENSORS,
}


def _essence(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def request_wire(
    request: Request, allowed: tuple[Wire, ...] = (Wire.JSON, Wire.SAFETENSORS)
) -> Wire:
    """The body's format from ``Content-Type``; 415 for anything else."""
    given = request.headers.get("content-type", "")
    wire = _BY_TYPE.get(_essence(given))
    if wire is None or wire not in allowed:
        supported = tuple(t for t, w in _BY_TYPE.items() if w in allowed)
        raise UnsupportedMediaType(given, supported)
    return wire


def _accepted(accept: str) -> list[tuple[float, str]]:
    ranges = []
    for part in accept.split(","):
        pieces = part.split(";")
        media = pieces[0].strip().lower()
        if not media:
            continue
        quality = 1.0
        for param in pieces[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
                if not 0.0 <= quality <= 1.0:
                    quality = 0.0
        ranges.append((quality, media))
    return ranges


def _quality(ranges: list[tuple[float, str]], media: str) -> tuple[float, int]:
    """Quality of ``media`` under the most specific matching range, with that specificity."""
    best = (0.0, -1)
    main = media.split("/", 1)[0]
    for quality, pattern in ranges:
        if pattern == media:
            specificity = 2
        elif pattern == f"{main}/*":
            specificity = 1
        elif pattern == "*/*":
            specificity = 0
        else:
            continue
        if specificity > best[1]:
            best = (quality, specificity)
    return best


def response_wire(
    request: Request,
    default: Wire,
    available: tuple[Wire, ...] = (Wire.JSON, Wire.SAFETENSORS),
) -> Wire:
    """The answer's format: the best ``Accept`` allows, ties going to ``default``; else 406."""
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return default if default in available else available[0]
    ranges = _accepted(accept)
    scored: list[tuple[float, int, Wire]] = []
    for media, wire in _BY_TYPE.items():
        if wire not in available:
            continue
        quality, _ = _quality(ranges, media)
        if quality > 0:
            scored.append((quality, 1 if wire is default else 0, wire))
    if not scored:
        raise NotAcceptable(accept, tuple(w.value for w in available))
    return max(scored, key=lambda item: (item[0], item[1]))[2]


def require_json_answer(request: Request) -> None:
    """For endpoints that answer JSON only: 406 unless ``Accept`` allows it."""
    response_wire(request, Wire.JSON, (Wire.JSON,))
