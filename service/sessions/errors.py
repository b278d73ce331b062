"""The errors the sessions layer raises, in one place.

Every error a client can cause is a :class:`SessionError` (or core's ``CoreError``: a bad
hyperparameter, an unknown name, bad tensors). The API maps each class to one HTTP status
in ``service/api/errors.py``; the attributes here are what its problem documents show.
"""

from __future__ import annotations

from service.core.errors import (
    CoreError,
    InvalidHyperparameter,
    InvalidInput,
    UnknownArguments,
    UnknownName,
)

__all__ = [
    "CoreError",
    "IdempotencyExpired",
    "IdempotencyKeyReused",
    "InvalidCheckpoint",
    "InvalidHyperparameter",
    "InvalidInput",
    "LimitExceeded",
    "ParamsNotHeld",
    "ParamsRequired",
    "PreconditionFailed",
    "SessionDamaged",
    "SessionError",
    "SessionNotFound",
    "StepInFlight",
    "StorageError",
    "UnknownArguments",
    "UnknownName",
]


class SessionError(Exception):
    """Base of the errors this layer raises about a request."""


class SessionNotFound(SessionError):
    """No such session for this tenant (another tenant's session is not found either)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class StepInFlight(SessionError):
    """A step with this idempotency key is being applied right now (409; retry later)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"a step with idempotency key {key!r} is in progress; retry later")
        self.key = key


class IdempotencyKeyReused(SessionError):
    """The key was used before with a different request body or return mode (422)."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different request; "
            "use a new key for a new step"
        )
        self.key = key


class IdempotencyExpired(SessionError):
    """The key was applied, but its response is no longer kept (409, names the step)."""

    def __init__(self, key: str, step: int) -> None:
        super().__init__(
            f"idempotency key {key!r} was applied at step {step}; "
            "its response is no longer kept, and the step was not applied again"
        )
        self.key = key
        self.step = step


class PreconditionFailed(SessionError):
    """``If-Match`` named another step than the session's current one (412)."""

    def __init__(self, expected: int, etag: str) -> None:
        super().__init__(f'the session is at ETag {etag}, not "{expected}"')
        self.expected = expected
        self.etag = etag


class ParamsRequired(SessionError):
    """The step needs parameter values and the session does not hold them (422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ParamsNotHeld(SessionError):
    """``GET .../params`` on a session that does not hold its parameters (409)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} does not hold parameters; create it with initial "
            'values ("data") to make it a parameter server'
        )
        self.session_id = session_id


class LimitExceeded(SessionError):
    """A configured resource limit would be exceeded (``limit`` names it)."""

    def __init__(self, limit: str, maximum: int, requested: int) -> None:
        super().__init__(f"{limit} is limited to {maximum}; this request needs {requested}")
        self.limit = limit
        self.maximum = maximum
        self.requested = requested


class InvalidCheckpoint(SessionError):
    """A posted checkpoint is not one that ``export_state`` wrote, or is damaged (422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StorageError(SessionError):
    """The durable store failed; nothing was acknowledged (503)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class SessionDamaged(StorageError):
    """The session's stored history does not read back (503 until an operator repairs it).

    Nothing is applied to it and nothing of it is served: its state could be wrong, and
    a step could repeat one already acknowledged."""

    def __init__(self, session_id: str, damage: str) -> None:
        super().__init__(
            f"session {session_id!r} is damaged and refuses steps and reads until an "
            f"operator repairs it (optserve check, optserve repair): {damage}"
        )
        self.session_id = session_id
        self.damage = damage
