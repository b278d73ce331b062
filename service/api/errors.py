"""Every error a request can meet, mapped to an RFC 9457 problem document in one place.

Each row names an exception class, its status, its problem type slug and title, and how
to fill the document's details. The most specific class in an exception's MRO wins, so
subclasses can be mapped apart from their bases. Anything unmapped is a bug: it becomes a
logged 500, which the fuzz tests exist to make impossible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.api import problems
from service.codec import strict_json
from service.codec.errors import InvalidValues, MalformedBody, TooManyTensors
from service.sessions import errors as domain
from service.sessions.federated import errors as federated
from service.sessions.store.base import StoreUnavailable

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "/problems/"

log = logging.getLogger("optserve.api")

Details = Callable[[Any], dict[str, Any]]
Headers = Callable[[Any], dict[str, str]]


@dataclass(frozen=True)
class Mapping:
    status: int
    slug: str
    title: str
    details: Details | None = None
    headers: Headers | None = None


def _field_errors(field: str | None, message: str) -> dict[str, Any]:
    return {"errors": [{"field": field, "message": message}]} if field else {}


def _hyperparameter(exc: domain.InvalidHyperparameter) -> dict[str, Any]:
    if isinstance(exc, domain.UnknownArguments):
        return {"errors": [{"field": f, "message": m} for f, m in exc.errors]}
    return {"errors": [{"field": exc.argument, "message": str(exc)}]}


def _invalid_input(exc: domain.InvalidInput) -> dict[str, Any]:
    return _field_errors(exc.field, str(exc))


def _malformed(exc: MalformedBody | InvalidValues) -> dict[str, Any]:
    return _field_errors(exc.field, str(exc))


def _bad_request(exc: problems.BadRequest) -> dict[str, Any]:
    return _field_errors(exc.field, str(exc))


def _invalid_request(exc: problems.InvalidRequest) -> dict[str, Any]:
    return {"errors": [{"field": f, "message": m} for f, m in exc.errors]}


def _limit(exc: domain.LimitExceeded) -> dict[str, Any]:
    return {"limit": exc.limit, "maximum": exc.maximum, "requested": exc.requested}


def _too_many(exc: TooManyTensors) -> dict[str, Any]:
    return {"limit": "tensors_per_request", "maximum": exc.limit, "requested": exc.count}


def _unauthorized_headers(exc: problems.Unauthorized) -> dict[str, str]:
    challenge = 'Bearer realm="optserve"'
    if exc.invalid_key:
        challenge += ', error="invalid_token"'
    return {"WWW-Authenticate": challenge}


MAPPINGS: dict[type[Exception], Mapping] = {
    # HTTP-level
    problems.Unauthorized: Mapping(
        401, "unauthorized", "Missing or invalid API key", headers=_unauthorized_headers
    ),
    # The rest of the body is still on its way, so these answers close the connection.
    problems.BodyTooLarge: Mapping(
        413,
        "body-too-large",
        "Request body too large",
        details=lambda e: {"limit": e.name, "maximum": e.limit},
        headers=lambda e: {"Connection": "close"},
    ),
    problems.BodyTimeout: Mapping(
        408,
        "body-timeout",
        "Request body timed out",
        details=lambda e: {"limit": "body_timeout_s", "seconds": e.seconds},
        headers=lambda e: {"Connection": "close"},
    ),
    problems.Busy: Mapping(
        503,
        "busy",
        "Too many request bodies in flight",
        details=lambda e: {"limit": "max_body_bytes_in_flight", "maximum": e.budget},
        headers=lambda e: {"Retry-After": str(e.retry_after), "Connection": "close"},
    ),
    problems.UnsupportedMediaType: Mapping(
        415,
        "unsupported-media-type",
        "Unsupported media type",
        details=lambda e: {"supported": list(e.supported)},
        headers=lambda e: {"Accept-Post": ", ".join(e.supported)},
    ),
    problems.NotAcceptable: Mapping(
        406,
        "not-acceptable",
        "No acceptable response type",
        details=lambda e: {"available": list(e.available)},
    ),
    problems.BadRequest: Mapping(400, "bad-request", "Bad request", details=_bad_request),
    # The client went away mid-body: nobody reads the answer, but it is no server error.
    ClientDisconnect: Mapping(400, "client-disconnected", "Client disconnected"),
    problems.InvalidRequest: Mapping(
        422, "invalid-request", "Invalid request", details=_invalid_request
    ),
    MalformedBody: Mapping(400, "malformed-body", "Malformed request body", details=_malformed),
    InvalidValues: Mapping(422, "invalid-input", "Invalid input", details=_malformed),
    TooManyTensors: Mapping(422, "limit-exceeded", "Limit exceeded", details=_too_many),
    # Sessions
    domain.SessionNotFound: Mapping(404, "session-not-found", "Session not found"),
    domain.StepInFlight: Mapping(
        409,
        "step-in-flight",
        "Step in progress",
        headers=lambda e: {"Retry-After": "1"},
    ),
    domain.IdempotencyKeyReused: Mapping(
        422, "idempotency-key-reused", "Idempotency key reused with another request"
    ),
    domain.IdempotencyExpired: Mapping(
        409,
        "idempotency-expired",
        "Idempotency key already applied",
        details=lambda e: {"applied_at_step": e.step},
    ),
    domain.PreconditionFailed: Mapping(
        412,
        "precondition-failed",
        "The session has moved on",
        details=lambda e: {"etag": e.etag},
        headers=lambda e: {"ETag": e.etag},
    ),
    domain.ParamsRequired: Mapping(422, "params-required", "Parameter values required"),
    domain.ParamsNotHeld: Mapping(409, "params-not-held", "Session does not hold parameters"),
    domain.LimitExceeded: Mapping(422, "limit-exceeded", "Limit exceeded", details=_limit),
    domain.InvalidCheckpoint: Mapping(422, "invalid-checkpoint", "Invalid checkpoint"),
    domain.SessionDamaged: Mapping(
        503, "session-damaged", "Session damaged", details=lambda e: {"damage": e.damage}
    ),
    domain.StorageError: Mapping(
        503, "storage-unavailable", "Storage unavailable", headers=lambda e: {"Retry-After": "1"}
    ),
    # Raised by a store read outside a step's commit (an archived-key lookup): the same 503.
    StoreUnavailable: Mapping(
        503, "storage-unavailable", "Storage unavailable", headers=lambda e: {"Retry-After": "1"}
    ),
    # Federated sessions
    federated.NotFederated: Mapping(409, "not-federated", "Session does not take client updates"),
    federated.StepsNotAccepted: Mapping(
        409, "federated-session", "Session takes client updates, not steps"
    ),
    federated.RoundClosed: Mapping(
        410,
        "round-closed",
        "Round already closed",
        details=lambda e: {"round": e.round, "current_round": e.current},
    ),
    federated.RoundNotOpen: Mapping(
        409,
        "round-not-open",
        "Round not open yet",
        details=lambda e: {"round": e.round, "current_round": e.current},
    ),
    federated.UpdateConflict: Mapping(
        409,
        "update-conflict",
        "Another update by this client",
        details=lambda e: {"client_id": e.client_id},
    ),
    federated.UpdateTooStale: Mapping(
        410,
        "update-too-stale",
        "Update too stale",
        details=lambda e: {
            "base_version": e.base_version,
            "version": e.version,
            "max_staleness": e.max_staleness,
        },
    ),
    domain.SessionError: Mapping(422, "invalid-request", "Invalid request"),
    # Core
    domain.InvalidHyperparameter: Mapping(
        422, "invalid-hyperparameter", "Invalid hyperparameter", details=_hyperparameter
    ),
    domain.UnknownName: Mapping(
        422,
        "unknown-name",
        "Unknown name",
        details=lambda e: {"errors": [{"field": f"{e.kind}.name", "message": str(e)}]},
    ),
    domain.InvalidInput: Mapping(422, "invalid-input", "Invalid input", details=_invalid_input),
    domain.CoreError: Mapping(422, "invalid-request", "Invalid request"),
}


def mapping_for(exc: BaseException) -> Mapping | None:
    for cls in type(exc).__mro__:
        found = MAPPINGS.get(cls)
        if found is not None:
            return found
    return None


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
        request_id = request.scope.get("state", {}).get("request_id")
        if request_id:
            body["request_id"] = request_id
    body.update(extra)
    content = strict_json.dumps(body, separators=(", ", ": "), default=str).encode()
    return Response(content, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def render(exc: BaseException, request: Request | None = None) -> Response:
    """The problem document for any exception (500 for an unmapped one)."""
    mapping = mapping_for(exc)
    if mapping is None:
        log.exception("unhandled error", exc_info=exc)
        return problem_response(
            500,
            "internal-error",
            "Internal server error",
            "the server failed to handle this request; it has been logged",
            request,
        )
    extra = mapping.details(exc) if mapping.details else {}
    headers = mapping.headers(exc) if mapping.headers else None
    return problem_response(
        mapping.status, mapping.slug, mapping.title, str(exc), request, headers, **extra
    )


def _validation(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
        out.append({"field": ".".join(loc) or "body", "message": str(error.get("msg", ""))})
    return out


def _http_slug(status: int) -> tuple[str, str]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return phrase.lower().replace(" ", "-").replace("'", ""), phrase


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into a problem document."""

    async def on_error(request: Request, exc: Exception) -> Response:
        return render(exc, request)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = _validation(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(
            422, "invalid-request", "Invalid request", detail, request, errors=errors
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        slug, title = _http_slug(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(
            exc.status_code, slug, title, detail, request, dict(exc.headers or {})
        )

    for cls in MAPPINGS:
        app.add_exception_handler(cls, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
