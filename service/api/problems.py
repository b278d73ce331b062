"""Errors the HTTP layer itself raises (auth, media types, body size, headers).

Domain errors come from ``service.sessions.errors`` and ``service.core.errors``; these are
the ones only HTTP knows about. ``service/api/errors.py`` maps both to problem documents.
"""

from __future__ import annotations


class ApiError(Exception):
    """Base of the HTTP layer's own errors."""


class Unauthorized(ApiError):
    def __init__(self, message: str, *, invalid_key: bool) -> None:
        super().__init__(message)
        self.invalid_key = invalid_key


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, name: str = "max_body_bytes", why: str = "") -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes{why}")
        self.limit = limit
        self.name = name


class BodyTimeout(ApiError):
    """The client stopped sending its body: nothing arrived for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"no part of the request body arrived for {seconds:g} seconds; the request is dropped"
        )
        self.seconds = seconds


class Busy(ApiError):
    """The server holds as many request bodies as it allows: try again shortly."""

    def __init__(self, budget: int, retry_after: int) -> None:
        super().__init__(
            f"the server is reading {budget} bytes of request bodies, its limit; "
            f"retry in {retry_after} s"
        )
        self.budget = budget
        self.retry_after = retry_after


class UnsupportedMediaType(ApiError):
    def __init__(self, given: str, supported: tuple[str, ...]) -> None:
        super().__init__(
            f"Content-Type {given or '(none)'!r} is not supported here; "
            f"send one of: {', '.join(supported)}"
        )
        self.supported = supported


class NotAcceptable(ApiError):
    def __init__(self, accept: str, available: tuple[str, ...]) -> None:
        super().__init__(
            f"cannot answer in any type the Accept header {accept!r} allows; "
            f"available: {', '.join(available)}"
        )
        self.available = available


class BadRequest(ApiError):
    """A request that cannot be read at all (bad header, unparseable body)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequest(ApiError):
    """A readable request whose fields are wrong (422), with one entry per bad field."""

    def __init__(self, message: str, errors: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.errors = errors
