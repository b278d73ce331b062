"""The asynchronous client: :class:`AsyncClient` and :class:`AsyncSession`.

The same requests, retries and errors as :mod:`optserve_client.client`, awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from optserve_client import _calls, _documents
from optserve_client._retry import RetryPolicy, next_delay
from optserve_client._session import ParamsSpec, SessionView, TensorsIn, session_config
from optserve_client._wire import Returns, StepResult, Wire, parse_tensor_reply
from optserve_client.client import auth_headers, server_root
from optserve_client.errors import TransportError, error_from_response


class AsyncClient:
    """An asyncio connection to an optserve server; see :class:`optserve_client.Client`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        wire: Wire = "safetensors",
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = server_root(url)
        self.wire: Wire = wire
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=auth_headers(api_key),
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def send(self, call: _calls.Call) -> httpx.Response:
        """Send ``call``, retrying what its safety allows; raise typed errors."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(
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
            await asyncio.sleep(delay)
            attempt += 1

    async def create_session(
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
    ) -> AsyncSession:
        """See :meth:`optserve_client.Client.create_session`."""
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
        response = await self.send(_calls.create(self.wire, config, initial))
        return AsyncSession(self, _documents.session_document(response))

    async def restore(self, checkpoint: bytes) -> AsyncSession:
        response = await self.send(_calls.restore(checkpoint))
        return AsyncSession(self, _documents.session_document(response))

    async def session(self, session_id: str) -> AsyncSession:
        response = await self.send(_calls.get(session_id))
        return AsyncSession(self, _documents.session_document(response))

    async def sessions(self, *, page_size: int | None = None) -> AsyncIterator[AsyncSession]:
        after: str | None = None
        while True:
            response = await self.send(_calls.list_page(page_size, after))
            page, after = _documents.session_page(response)
            for document in page:
                yield AsyncSession(self, document)
            if after is None:
                return

    async def delete_session(self, session_id: str) -> None:
        await self.send(_calls.delete(session_id))

    async def optimizers(self) -> list[dict[str, Any]]:
        return _documents.catalog(await self.send(_calls.optimizers()), "optimizers")

    async def schedules(self) -> list[dict[str, Any]]:
        return _documents.catalog(await self.send(_calls.schedules()), "schedules")

    async def preview(
        self,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        steps: int = 100,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[list[float]]:
        groups = list(param_groups) if param_groups is not None else None
        call = _calls.preview(optimizer, schedule, steps, groups)
        return _documents.preview(await self.send(call))

    async def healthy(self) -> bool:
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        return await self._probe("/readyz")

    async def _probe(self, path: str) -> bool:
        try:
            return (await self._http.get(path)).is_success
        except httpx.TransportError:
            return False


class AsyncSession(SessionView):
    """One optimizer session; see :class:`optserve_client.Session`."""

    def __init__(self, client: AsyncClient, document: Mapping[str, Any]) -> None:
        super().__init__(document, client.wire)
        self.client = client

    async def step(
        self,
        grads: TensorsIn,
        *,
        params: TensorsIn | None = None,
        loss: float | None = None,
        returns: Returns = "delta",
        if_match: int | bool | None = None,
        idempotency_key: str | None = None,
    ) -> StepResult:
        call = self._step_call(grads, params, loss, returns, if_match, idempotency_key)
        return self._step_result(await self.client.send(call), returns)

    async def params(self) -> dict[str, np.ndarray]:
        response = await self.client.send(_calls.params(self.id, self.wire))
        return parse_tensor_reply(
            response.headers.get("content-type", ""), response.content, self.shapes, self.dtype
        )

    async def state(self) -> bytes:
        return (await self.client.send(_calls.state(self.id))).content

    async def schedule_step(self, metric: float | None = None) -> None:
        response = await self.client.send(_calls.schedule_step(self.id, metric))
        if response.content:
            self._absorb(_documents.json_body(response))

    async def refresh(self) -> AsyncSession:
        self._absorb(_documents.json_body(await self.client.send(_calls.get(self.id))))
        return self

    async def delete(self) -> None:
        await self.client.delete_session(self.id)
