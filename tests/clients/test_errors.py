"""Problem documents map to the most specific exception class."""

from __future__ import annotations

import httpx
import pytest
from optserve_client import errors


def response(status: int, body: object = None, content: bytes | None = None) -> httpx.Response:
    if content is None:
        return httpx.Response(
            status, json=body, headers={"content-type": "application/problem+json"}
        )
    return httpx.Response(status, content=content)


@pytest.mark.parametrize(
    ("status", "problem_type", "expected"),
    [
        (404, "/problems/session-not-found", errors.SessionNotFound),
        (409, "https://example.invalid/problems/step-in-flight", errors.StepInFlight),
        (409, "urn:optserve:idempotency-expired", errors.IdempotencyExpired),
        (400, "/problems/malformed-body", errors.BadRequest),
        (422, "/problems/idempotency-key-reused", errors.IdempotencyKeyReused),
        (422, "/problems/params-required", errors.ParamsRequired),
        (409, "/problems/limit-exceeded", errors.LimitExceeded),
        (400, "about:blank", errors.BadRequest),
        (401, "about:blank", errors.Unauthorized),
        (403, "about:blank", errors.Forbidden),
        (404, "about:blank", errors.NotFound),
        (409, "about:blank", errors.Conflict),
        (412, "about:blank", errors.PreconditionFailed),
        (413, "about:blank", errors.PayloadTooLarge),
        (415, "about:blank", errors.UnsupportedMediaType),
        (422, "/problems/invalid-hyperparameter", errors.InvalidHyperparameter),
        (422, "/problems/unknown-name", errors.UnknownName),
        (422, "/problems/invalid-input", errors.InvalidInput),
        (422, "/problems/invalid-checkpoint", errors.InvalidCheckpoint),
        (422, "/problems/invalid-request", errors.ValidationError),
        (409, "/problems/params-not-held", errors.ParamsNotHeld),
        (406, "/problems/not-acceptable", errors.NotAcceptable),
        (429, "about:blank", errors.TooManyRequests),
        (500, "about:blank", errors.ServerError),
        (503, "/problems/storage-unavailable", errors.ServerError),
        (503, "/problems/session-damaged", errors.SessionDamaged),
        (418, "about:blank", errors.APIError),
    ],
)
def test_class_follows_type_then_status(
    status: int, problem_type: str, expected: type[errors.APIError]
) -> None:
    error = errors.error_from_response(response(status, {"type": problem_type, "status": status}))
    assert type(error) is expected
    assert isinstance(error, errors.APIError) and isinstance(error, errors.OptserveError)
    assert error.status == status


def test_message_carries_title_detail_and_field_errors() -> None:
    body = {
        "type": "/problems/invalid-hyperparameter",
        "title": "Invalid hyperparameter",
        "status": 422,
        "detail": "2 errors",
        "errors": [
            {"field": "optimizer.betas", "message": "Invalid beta parameter at index 0: 1.5"},
            {"field": "schedule.T_max", "message": "must be an integer"},
        ],
        "request_id": "r-1",
    }
    error = errors.error_from_response(response(422, body))
    assert error.fields == ["optimizer.betas", "schedule.T_max"]
    assert error.problem["request_id"] == "r-1"
    text = str(error)
    assert "422 Invalid hyperparameter: 2 errors" in text
    assert "optimizer.betas: Invalid beta parameter at index 0: 1.5" in text


def test_a_non_json_error_body_still_gives_a_useful_error() -> None:
    error = errors.error_from_response(response(502, content=b"<html>Bad gateway</html>"))
    assert isinstance(error, errors.ServerError)
    assert "Bad gateway" in str(error) and error.errors == []
