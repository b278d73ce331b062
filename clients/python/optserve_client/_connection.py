"""What both clients hold: the server's root URL, the wire format, the retry policy; auth."""

from __future__ import annotations

import os

from optserve_client._calls import Call
from optserve_client._retry import RetryPolicy
from optserve_client._tries import Tries
from optserve_client._wire import Wire

DEFAULT_URL = "http://127.0.0.1:8000"


def server_root(url: str | None) -> str:
    """The server's root URL; ``OPTSERVE_URL`` when not given. A trailing ``/v1`` is dropped."""
    root = (url or os.environ.get("OPTSERVE_URL") or DEFAULT_URL).rstrip("/")
    return root.removesuffix("/v1")


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("OPTSERVE_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


class Connection:
    """The settings :class:`~optserve_client.Client` and ``AsyncClient`` share; each adds
    its own httpx client for :attr:`url`, with :func:`auth_headers`."""

    def __init__(self, url: str | None, wire: Wire, retry: RetryPolicy | None) -> None:
        self.url = server_root(url)
        self.wire: Wire = wire
        self.retry = retry or RetryPolicy()

    def _tries(self, call: Call) -> Tries:
        return Tries(call, self.retry, self.url)
