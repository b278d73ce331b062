"""What both clients hold: the server's root URL, the wire format, the retry policy; auth."""

from __future__ import annotations

import os

from optserve_client._calls import Call
from optserve_client._retry import RetryPolicy
from optserve_client._tries import Tries
from optserve_client._wire import UPLOAD_DTYPES, UploadDtype, Wire

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

    def __init__(
        self,
        url: str | None,
        wire: Wire,
        retry: RetryPolicy | None,
        upload_dtype: UploadDtype | None = None,
    ) -> None:
        if upload_dtype is not None and upload_dtype not in UPLOAD_DTYPES:
            raise ValueError(f"upload_dtype must be one of {UPLOAD_DTYPES} or None")
        if upload_dtype is not None and wire != "safetensors":
            raise ValueError("upload_dtype needs wire='safetensors' (JSON sends decimal text)")
        self.url = server_root(url)
        self.wire: Wire = wire
        self.retry = retry or RetryPolicy()
        self.upload_dtype: UploadDtype | None = upload_dtype

    def _tries(self, call: Call) -> Tries:
        return Tries(call, self.retry, self.url)
