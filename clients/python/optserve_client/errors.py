"""Every exception the client raises, in one hierarchy.

::

    OptserveError
    ├── TransportError            the server could not be reached (after retries)
    ├── ProtocolError             the server answered something the client cannot read
    └── APIError                  the server answered with a problem document (RFC 9457)
        ├── BadRequest            400
        ├── Unauthorized          401
        ├── Forbidden             403
        ├── NotFound              404
        │   └── SessionNotFound
        ├── NotAcceptable         406
        ├── Conflict              409
        │   ├── StepInFlight          a step with this key is still running
        │   ├── IdempotencyExpired    the key was applied too long ago to replay
        │   └── ParamsNotHeld         GET .../params on a session without params
        ├── PreconditionFailed    412 (If-Match: the session moved on)
        ├── PayloadTooLarge       413
        ├── UnsupportedMediaType  415
        ├── ValidationError       422, with ``errors`` naming the fields
        │   ├── InvalidHyperparameter an optimizer, schedule or clipping argument
        │   ├── UnknownName           no such optimizer or schedule
        │   ├── InvalidInput          gradients or params of the wrong shape, NaN, ...
        │   ├── InvalidCheckpoint     a checkpoint that cannot be restored
        │   ├── ParamsRequired        the update needs parameter values
        │   └── IdempotencyKeyReused  the key was used for another body
        ├── LimitExceeded         a tenant or session limit
        ├── TooManyRequests       429
        └── ServerError           5xx

:func:`error_from_response` picks the most specific class from the problem's ``type``
(its last path segment, e.g. ``.../step-in-flight``) and falls back on the status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = [
    "APIError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "IdempotencyExpired",
    "IdempotencyKeyReused",
    "InvalidCheckpoint",
    "InvalidHyperparameter",
    "InvalidInput",
    "LimitExceeded",
    "NotAcceptable",
    "NotFound",
    "OptserveError",
    "ParamsNotHeld",
    "ParamsRequired",
    "PayloadTooLarge",
    "PreconditionFailed",
    "ProtocolError",
    "ServerError",
    "SessionDamaged",
    "SessionNotFound",
    "StepInFlight",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "UnknownName",
    "UnsupportedMediaType",
    "ValidationError",
    "error_from_response",
]


class OptserveError(Exception):
    """Base of everything this package raises."""


class TransportError(OptserveError):
    """The request could not be completed: connection refused, reset, timed out."""


class ProtocolError(OptserveError):
    """The server's answer is not what the API promises (bad JSON, bad safetensors)."""


class APIError(OptserveError):
    """An HTTP error answer, carrying its problem document.

    ``problem`` is the whole document; ``type``, ``title``, ``detail`` and ``errors`` are
    its standard members, and any extension member is available as ``problem[key]``.
    """

    def __init__(self, status: int, problem: Mapping[str, Any], headers: httpx.Headers) -> None:
        self.status = status
        self.problem = dict(problem)
        self.headers = headers
        self.type = str(problem.get("type", "about:blank"))
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        raw_errors = problem.get("errors")
        self.errors: list[dict[str, Any]] = (
            [e for e in raw_errors if isinstance(e, dict)] if isinstance(raw_errors, list) else []
        )
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status} {self.title}".rstrip()
        if self.detail:
            text += f": {self.detail}"
        for error in self.errors:
            field = error.get("field") or ""
            message = error.get("message") or ""
            if not (message == self.detail and len(self.errors) == 1):
                text += f"\n  {field}: {message}"
        return text

    @property
    def fields(self) -> list[str]:
        """The field paths the validation errors name (``"optimizer.betas"``, ...)."""
        return [str(e["field"]) for e in self.errors if e.get("field") is not None]


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    pass


class Forbidden(APIError):
    pass


class NotFound(APIError):
    pass


class SessionNotFound(NotFound):
    pass


class Conflict(APIError):
    pass


class StepInFlight(Conflict):
    """Another request with the same Idempotency-Key is still being applied; retryable."""


class IdempotencyExpired(Conflict):
    """The key was applied long ago; its response is no longer kept (nothing was redone).

    The step at which it was applied is in ``applied_step`` when the server says it.
    """

    @property
    def applied_step(self) -> int | None:
        for key in ("applied_at_step", "applied_step", "step"):
            value = self.problem.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


class ParamsNotHeld(Conflict):
    pass


class NotAcceptable(APIError):
    pass


class PreconditionFailed(APIError):
    """If-Match did not match: the session is at another step (see ``etag``)."""

    @property
    def etag(self) -> str | None:
        value = self.headers.get("etag") or self.problem.get("etag")
        return str(value) if value is not None else None


class PayloadTooLarge(APIError):
    pass


class UnsupportedMediaType(APIError):
    pass


class ValidationError(APIError):
    pass


class InvalidHyperparameter(ValidationError):
    pass


class UnknownName(ValidationError):
    pass


class InvalidInput(ValidationError):
    pass


class InvalidCheckpoint(ValidationError):
    pass


class ParamsRequired(ValidationError):
    pass


class IdempotencyKeyReused(ValidationError):
    pass


class LimitExceeded(APIError):
    pass


class TooManyRequests(APIError):
    pass


class ServerError(APIError):
    pass


class SessionDamaged(ServerError):
    """503: the session's stored history does not read back; the server refuses it until
    an operator repairs it (``optserve check``, ``optserve repair``). Not retried."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    406: NotAcceptable,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: TooManyRequests,
}

_BY_TYPE: dict[str, type[APIError]] = {
    "session-not-found": SessionNotFound,
    "step-in-flight": StepInFlight,
    "idempotency-expired": IdempotencyExpired,
    "idempotency-key-reused": IdempotencyKeyReused,
    "params-required": ParamsRequired,
    "params-not-held": ParamsNotHeld,
    "limit-exceeded": LimitExceeded,
    "precondition-failed": PreconditionFailed,
    "invalid-hyperparameter": InvalidHyperparameter,
    "unknown-name": UnknownName,
    "invalid-input": InvalidInput,
    "invalid-checkpoint": InvalidCheckpoint,
    "session-damaged": SessionDamaged,
}


def error_from_response(response: httpx.Response) -> APIError:
    """The typed exception for an error response (its body read already)."""
    problem = _problem(response)
    slug = _slug(str(problem.get("type", "")))
    cls = _BY_TYPE.get(slug)
    if cls is None:
        cls = (
            ServerError
            if response.status_code >= 500
            else _BY_STATUS.get(response.status_code, APIError)
        )
    return cls(response.status_code, problem, response.headers)


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content) if response.content else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = None
    if isinstance(body, dict):
        return body
    # Not a problem document (a proxy's HTML page, say): keep what there is to show.
    return {
        "title": response.reason_phrase,
        "status": response.status_code,
        "detail": response.text[:500] if response.content else "",
    }


def _slug(problem_type: str) -> str:
    return problem_type.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
