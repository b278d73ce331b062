"""When to try a request again, and how long to wait first.

What is safe to repeat depends on the request:

- ``"idempotent"``: reads, deletes, previews, and steps carrying an ``Idempotency-Key``
  (the server applies a key at most once and replays its answer). These are retried on
  any transport error, on 5xx and 429, and, for steps, on 409 "step in flight".
- ``"unsent"``: requests that change state without a key (create a session). These are
  retried only when the request provably never reached the server (connection refused,
  connect timeout) or the server refused it outright (429, 503).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx

from optserve_client.errors import APIError, SessionDamaged, StepInFlight

Safety = Literal["idempotent", "unsent"]

_UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honouring ``Retry-After``.

    ``attempts`` counts every try, the first included; ``attempts=1`` never retries.
    """

    attempts: int = 6
    backoff: float = 0.05
    """Seconds before the first retry; doubles each time."""
    max_backoff: float = 5.0
    jitter: bool = True

    def delay(self, retry: int, headers: httpx.Headers | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if headers is not None:
            hinted = _retry_after(headers)
            if hinted is not None:
                return min(hinted, self.max_backoff)
        ceiling = min(self.max_backoff, self.backoff * (2**retry))
        return random.uniform(0.0, ceiling) if self.jitter else ceiling

    def retries_exception(self, safety: Safety, exc: httpx.HTTPError) -> bool:
        if not isinstance(exc, httpx.TransportError):
            return False
        return safety == "idempotent" or isinstance(exc, _UNSENT_ERRORS)

    def retries_error(self, safety: Safety, error: APIError) -> bool:
        if isinstance(error, SessionDamaged):
            return False  # it stays damaged until an operator repairs it
        if error.status in (429, 503):
            return True
        if safety != "idempotent":
            return False
        return error.status >= 500 or isinstance(error, StepInFlight)


NO_RETRY = RetryPolicy(attempts=1)


def next_delay(
    policy: RetryPolicy,
    safety: Safety,
    attempt: int,
    *,
    error: APIError | None = None,
    exc: httpx.HTTPError | None = None,
) -> float | None:
    """Seconds to wait before trying again after a failed ``attempt``, or None to give up."""
    if attempt + 1 >= policy.attempts:
        return None
    if exc is not None and policy.retries_exception(safety, exc):
        return policy.delay(attempt)
    if error is not None and policy.retries_error(safety, error):
        return policy.delay(attempt, error.headers)
    return None


def _retry_after(headers: httpx.Headers) -> float | None:
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
