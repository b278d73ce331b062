"""Python client for optserve, the optimizer-as-a-service.

>>> from optserve_client import Client
>>> with Client("http://127.0.0.1:8000") as client:            # doctest: +SKIP
...     session = client.create_session({"name": "AdamW", "lr": 1e-3}, {"w": (3, 2)})
...     result = session.step({"w": grad}, params={"w": w})
...     w += result.deltas["w"]

``optserve_client.torch.RemoteOptimizer`` (needs torch) is a ``torch.optim.Optimizer``
backed by a session.
"""

from optserve_client._retry import NO_RETRY, RetryPolicy
from optserve_client._wire import StepResult
from optserve_client.aio import AsyncClient, AsyncSession
from optserve_client.client import Client, Session
from optserve_client.errors import (
    APIError,
    BadRequest,
    Conflict,
    Forbidden,
    IdempotencyExpired,
    IdempotencyKeyReused,
    InvalidCheckpoint,
    InvalidHyperparameter,
    InvalidInput,
    LimitExceeded,
    NotAcceptable,
    NotFound,
    OptserveError,
    ParamsNotHeld,
    ParamsRequired,
    PayloadTooLarge,
    PreconditionFailed,
    ProtocolError,
    ServerError,
    SessionDamaged,
    SessionNotFound,
    StepInFlight,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnknownName,
    UnsupportedMediaType,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "NO_RETRY",
    "APIError",
    "AsyncClient",
    "AsyncSession",
    "BadRequest",
    "Client",
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
    "RetryPolicy",
    "ServerError",
    "Session",
    "SessionDamaged",
    "SessionNotFound",
    "StepInFlight",
    "StepResult",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "UnknownName",
    "UnsupportedMediaType",
    "ValidationError",
]
