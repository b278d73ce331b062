"""The synchronous client: :class:`Client` and its :class:`Session` objects."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from optserve_client import _calls, _documents
from optserve_client._retry import RetryPolicy, next_delay
from optserve_client._session import ParamsSpec, SessionView, TensorsIn, session_config
from optserve_client._wire import Returns, StepResult, Wire, parse_tensor_reply
from optserve_client.errors import TransportError, error_from_response

DEFAULT_URL = "http://127.0.0.1:8000"


def server_root(url: str | None) -> str:
    """The server's root URL; ``OPTSERVE_URL`` when not given. A trailing ``/v1`` is dropped."""
    root = (url or os.environ.get("OPTSERVE_URL") or DEFAULT_URL).rstrip("/")
    return root.removesuffix("/v1")


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("OPTSERVE_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


class Client:
    """A connection to an optserve server.

    ``wire`` picks the tensor format of steps and params: ``"safetensors"`` (raw bytes,
    the default) or ``"json"``. ``api_key`` defaults to ``OPTSERVE_API_KEY``; ``url`` to
    ``OPTSERVE_URL``, else ``http://127.0.0.1:8000``. Steps carry an ``Idempotency-Key``
    and are retried per ``retry`` on connection errors, 5xx and 409 "in flight".
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        wire: Wire = "safetensors",
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = server_root(url)
        self.wire: Wire = wire
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=self.url,
            headers=auth_headers(api_key),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, call: _calls.Call) -> httpx.Response:
        """Send ``call``, retrying what its safety allows; raise typed errors."""
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    headers=call.headers,
                    content=call.content,
                    params=call.params or None,
                )
            except httpx.TransportError as exc:
                delay = next_delay(self.retry, call.safety, attempt, exc=exc)
                if delay is None:
                    raise TransportError(f"{call.method} {self.url}{call.path}: {exc!r}") from exc
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                if attempt > 0 and call.gone_ok_on_retry and error.status == 404:
                    return response
                delay = next_delay(self.retry, call.safety, attempt, error=error)
                if delay is None:
                    raise error
            time.sleep(delay)
            attempt += 1

    # Sessions

    def create_session(
        self,
        optimizer: Mapping[str, Any],
        params: ParamsSpec,
        *,
        schedule: Mapping[str, Any] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        dtype: str = "float32",
        clip_grad_norm: Mapping[str, Any] | float | None = None,
        clip_grad_value: Mapping[str, Any] | float | None = None,
        nonfinite: str | None = None,
        labels: Mapping[str, str] | None = None,
        hold_params: bool | None = None,
    ) -> Session:
        """Create a session. ``params`` maps names to shapes (tuples) or initial arrays.

        With arrays the session holds the parameters (unless ``hold_params=False``): it
        applies its own deltas, steps need no parameter values, ``Session.params()``
        serves them.
        """
        config, initial = session_config(
            optimizer=optimizer,
            params=params,
            schedule=schedule,
            param_groups=param_groups,
            dtype=dtype,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            nonfinite=nonfinite,
            labels=labels,
            hold_params=hold_params,
        )
        response = self.send(_calls.create(self.wire, config, initial))
        return Session(self, _documents.session_document(response))

    def restore(self, checkpoint: bytes) -> Session:
        """A new session from a checkpoint (``Session.state()``) that continues exactly."""
        return Session(self, _documents.session_document(self.send(_calls.restore(checkpoint))))

    def session(self, session_id: str) -> Session:
        return Session(self, _documents.session_document(self.send(_calls.get(session_id))))

    def sessions(self, *, page_size: int | None = None) -> Iterator[Session]:
        """Every session of this tenant, fetched page by page."""
        after: str | None = None
        while True:
            page, after = _documents.session_page(self.send(_calls.list_page(page_size, after)))
            for document in page:
                yield Session(self, document)
            if after is None:
                return

    def delete_session(self, session_id: str) -> None:
        self.send(_calls.delete(session_id))

    # Catalog and health

    def optimizers(self) -> list[dict[str, Any]]:
        return _documents.catalog(self.send(_calls.optimizers()), "optimizers")

    def schedules(self) -> list[dict[str, Any]]:
        return _documents.catalog(self.send(_calls.schedules()), "schedules")

    def preview(
        self,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        steps: int = 100,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[list[float]]:
        """The lr of each parameter group at each of ``steps`` steps."""
        groups = list(param_groups) if param_groups is not None else None
        return _documents.preview(self.send(_calls.preview(optimizer, schedule, steps, groups)))

    def healthy(self) -> bool:
        """``GET /healthz`` answered 2xx."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """``GET /readyz`` answered 2xx (the store is reachable)."""
        return self._probe("/readyz")

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path).is_success
        except httpx.TransportError:
            return False


class Session(SessionView):
    """One optimizer session on the server. Its document is refreshed by every step."""

    def __init__(self, client: Client, document: Mapping[str, Any]) -> None:
        super().__init__(document, client.wire)
        self.client = client

    def step(
        self,
        grads: TensorsIn,
        *,
        params: TensorsIn | None = None,
        loss: float | None = None,
        returns: Returns = "delta",
        if_match: int | bool | None = None,
        idempotency_key: str | None = None,
    ) -> StepResult:
        """Apply one optimizer step to ``grads`` and return the deltas (or new params).

        ``params`` are the current values, needed when the update reads them (weight
        decay) and the session does not hold them. ``if_match=True`` refuses the step
        (412) if the session moved past the step this object last saw. A fresh
        ``Idempotency-Key`` is generated unless given; retries reuse it.
        """
        call = self._step_call(grads, params, loss, returns, if_match, idempotency_key)
        return self._step_result(self.client.send(call), returns)

    def params(self) -> dict[str, np.ndarray]:
        """The parameters a session holds."""
        response = self.client.send(_calls.params(self.id, self.wire))
        return parse_tensor_reply(
            response.headers.get("content-type", ""), response.content, self.shapes, self.dtype
        )

    def state(self) -> bytes:
        """A self-describing safetensors checkpoint; ``Client.restore`` continues it."""
        return self.client.send(_calls.state(self.id)).content

    def schedule_step(self, metric: float | None = None) -> None:
        """Advance a manual schedule (ReduceLROnPlateau needs ``metric``)."""
        response = self.client.send(_calls.schedule_step(self.id, metric))
        if response.content:
            self._absorb(_documents.json_body(response))

    def refresh(self) -> Session:
        self._absorb(_documents.json_body(self.client.send(_calls.get(self.id))))
        return self

    def delete(self) -> None:
        self.client.delete_session(self.id)
