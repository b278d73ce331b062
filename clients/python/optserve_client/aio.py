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

from optserve_client import _calls, _documents, _history
from optserve_client._connection import Connection, auth_headers
from optserve_client._retry import RetryPolicy
from optserve_client._session import ParamsSpec, SessionView, TensorsIn, session_config
from optserve_client._sockets import AsyncSocketTransport
from optserve_client._transfer import aread_reply
from optserve_client._wire import SAFETENSORS, Returns, StepResult, UploadDtype, Wire


class AsyncClient(Connection):
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
        upload_dtype: UploadDtype | None = None,
    ) -> None:
        super().__init__(url, wire, retry, upload_dtype)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=auth_headers(api_key),
            timeout=timeout,
            transport=transport if transport is not None else AsyncSocketTransport(),
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
        return (await self.send_for_tensors(call, ""))[0]

    async def send_for_tensors(
        self, call: _calls.Call, media_type: str
    ) -> tuple[httpx.Response, bytes | memoryview]:
        """:meth:`send`, and the body, read into one buffer when it is of ``media_type``
        (``_transfer.aread_reply``)."""
        tries = self._tries(call)
        delay: float | None
        while True:
            try:
                response = await self._http.send(tries.request(self._http, media_type), stream=True)
                try:
                    ok = response.is_success
                    body = await aread_reply(response, media_type) if ok else await response.aread()
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                delay = tries.after_transport_error(exc)
            else:
                delay = tries.after_response(response)
                if delay is None:
                    return response, body
            await asyncio.sleep(delay)

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
        missing_grads: str | None = None,
        accumulate: Mapping[str, Any] | None = None,
        averaging: Mapping[str, Any] | None = None,
        aggregation: Mapping[str, Any] | None = None,
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
            missing_grads=missing_grads,
            accumulate=accumulate,
            averaging=averaging,
            aggregation=aggregation,
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
        pages = _documents.SessionPages(page_size)
        while (call := pages.next_call()) is not None:
            for document in pages.read(await self.send(call)):
                yield AsyncSession(self, document)

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
        call = _calls.preview(optimizer, schedule, steps, param_groups)
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
        super().__init__(document, client.wire, client.upload_dtype)
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
        response, body = await self.client.send_for_tensors(call, SAFETENSORS)
        return self._step_result(response, body, returns)

    async def params(
        self, *, evaluation: bool = False, average: bool = False
    ) -> dict[str, np.ndarray]:
        call = _calls.params(self.id, self.wire, evaluation, average)
        return self._tensors(*(await self.client.send_for_tensors(call, SAFETENSORS)))

    async def state(self) -> bytes:
        return (await self.client.send(_calls.state(self.id))).content

    async def schedule_step(self, metric: float | None = None) -> None:
        self._absorb_reply(await self.client.send(_calls.schedule_step(self.id, metric)))

    async def refresh(self) -> AsyncSession:
        self._absorb(_documents.json_body(await self.client.send(_calls.get(self.id))))
        return self

    async def edit_group(
        self,
        index: int,
        values: Mapping[str, Any],
        *,
        reason: str | None = None,
        if_match: int | None = None,
    ) -> AsyncSession:
        """:meth:`optserve_client.Session.edit_group`, awaited."""
        call = self._edit_call(index, values, reason, if_match)
        self._absorb_reply(await self.client.send(call))
        return self

    async def add_group(
        self, params: ParamsSpec, *, reason: str | None = None, **options: Any
    ) -> AsyncSession:
        """:meth:`optserve_client.Session.add_group`, awaited."""
        self._absorb_reply(await self.client.send(self._add_call(params, options, reason)))
        return self

    async def changes(self) -> list[dict[str, Any]]:
        """:meth:`optserve_client.Session.changes`, awaited."""
        entries: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            page = _documents.json_body(await self.client.send(_calls.changes(self.id, after)))
            entries.extend(page["changes"])
            after = page.get("next")
            if after is None:
                return entries

    async def steps(self) -> list[dict[str, Any]]:
        """:meth:`optserve_client.Session.steps`, awaited."""
        records: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            page, after = _history.page(await self.client.send(_calls.steps(self.id, after)))
            records.extend(page)
            if after is None:
                return records

    async def steps_csv(self) -> str:
        """:meth:`optserve_client.Session.steps_csv`, awaited."""
        return _history.to_csv(await self.steps())

    async def delete(self) -> None:
        await self.client.delete_session(self.id)
