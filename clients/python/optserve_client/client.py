"""The synchronous client: :class:`Client` and its :class:`Session` objects."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from optserve_client import _calls, _documents, _history
from optserve_client._connection import DEFAULT_URL, Connection, auth_headers, server_root
from optserve_client._retry import RetryPolicy
from optserve_client._session import ParamsSpec, SessionView, TensorsIn, session_config
from optserve_client._sockets import SocketTransport
from optserve_client._transfer import read_reply
from optserve_client._wire import SAFETENSORS, Returns, StepResult, UploadDtype, Wire

__all__ = ["DEFAULT_URL", "Client", "Session", "auth_headers", "server_root"]


class Client(Connection):
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
        upload_dtype: UploadDtype | None = None,
    ) -> None:
        super().__init__(url, wire, retry, upload_dtype)
        self._http = httpx.Client(
            base_url=self.url,
            headers=auth_headers(api_key),
            timeout=timeout,
            # Steps' tensors move between the arrays and the socket (``_sockets``).
            transport=transport if transport is not None else SocketTransport(),
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
        return self.send_for_tensors(call, "")[0]

    def send_for_tensors(
        self, call: _calls.Call, media_type: str
    ) -> tuple[httpx.Response, bytes | memoryview]:
        """:meth:`send`, and the body, read into one buffer when it is of ``media_type``
        (``_transfer.read_reply``)."""
        tries = self._tries(call)
        delay: float | None
        while True:
            try:
                response = self._http.send(tries.request(self._http, media_type), stream=True)
                try:
                    ok = response.is_success
                    body = read_reply(response, media_type) if ok else response.read()
                finally:
                    response.close()
            except httpx.TransportError as exc:
                delay = tries.after_transport_error(exc)
            else:
                delay = tries.after_response(response)
                if delay is None:
                    return response, body
            time.sleep(delay)

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
        missing_grads: str | None = None,
        accumulate: Mapping[str, Any] | None = None,
        averaging: Mapping[str, Any] | None = None,
        aggregation: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create a session. ``params`` maps names to shapes (tuples) or initial arrays.

        With arrays the session holds the parameters (unless ``hold_params=False``): it
        applies its own deltas, steps need no parameter values, ``Session.params()``
        serves them. ``missing_grads="skip"`` lets a step leave tensors out, as torch
        skips a parameter without a gradient. ``accumulate={"steps": k}`` makes every
        k-th step post apply one step to the mean of the k gradients posted;
        ``averaging={"kind": "ema", "decay": d}`` (or ``"swa"``) keeps averaged weights,
        read with ``Session.params(average=True)``. ``aggregation={"mode": "rounds", ...}``
        makes a federated session, which clients join with
        :class:`optserve_client.federated.FederatedClient`.
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
            missing_grads=missing_grads,
            accumulate=accumulate,
            averaging=averaging,
            aggregation=aggregation,
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
        pages = _documents.SessionPages(page_size)
        while (call := pages.next_call()) is not None:
            for document in pages.read(self.send(call)):
                yield Session(self, document)

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
        call = _calls.preview(optimizer, schedule, steps, param_groups)
        return _documents.preview(self.send(call))

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
        super().__init__(document, client.wire, client.upload_dtype)
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
        response, body = self.client.send_for_tensors(call, SAFETENSORS)
        return self._step_result(response, body, returns)

    def params(self, *, evaluation: bool = False, average: bool = False) -> dict[str, np.ndarray]:
        """The parameters a session holds; with ``evaluation``, the point to evaluate the
        model at (schedule-free optimizers' average, what their ``eval()`` sets); with
        ``average`` their averaged copy (a session created with ``averaging``)."""
        call = _calls.params(self.id, self.wire, evaluation, average)
        return self._tensors(*self.client.send_for_tensors(call, SAFETENSORS))

    def state(self) -> bytes:
        """A self-describing safetensors checkpoint; ``Client.restore`` continues it."""
        return self.client.send(_calls.state(self.id)).content

    def schedule_step(self, metric: float | None = None) -> None:
        """Advance a manual schedule (ReduceLROnPlateau needs ``metric``)."""
        self._absorb_reply(self.client.send(_calls.schedule_step(self.id, metric)))

    def refresh(self) -> Session:
        self._absorb(_documents.json_body(self.client.send(_calls.get(self.id))))
        return self

    def edit_group(
        self,
        index: int,
        values: Mapping[str, Any],
        *,
        reason: str | None = None,
        if_match: int | None = None,
    ) -> Session:
        """Set hyperparameters of ``param_groups[index]`` from the next step on (torch's
        ``optimizer.param_groups[index][key] = value``); recorded in :meth:`changes`."""
        self._absorb_reply(self.client.send(self._edit_call(index, values, reason, if_match)))
        return self

    def add_group(
        self, params: ParamsSpec, *, reason: str | None = None, **options: Any
    ) -> Session:
        """Add tensors as a new last group with ``options`` (torch's ``add_param_group``).
        A session that holds its parameters needs initial arrays for them."""
        self._absorb_reply(self.client.send(self._add_call(params, options, reason)))
        return self

    def changes(self) -> list[dict[str, Any]]:
        """The change log: every group edit (one entry per field) and added group."""
        entries: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            page = _documents.json_body(self.client.send(_calls.changes(self.id, after)))
            entries.extend(page["changes"])
            after = page.get("next")
            if after is None:
                return entries

    def steps(self) -> list[dict[str, Any]]:
        """The step history, oldest first: one record per optimizer step, applied or
        skipped (``seq``, ``step``, ``time``, ``lr`` per group, ``applied``, ``skipped``,
        ``metrics``), as far back as the server's retention keeps it."""
        records: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            page, after = _history.page(self.client.send(_calls.steps(self.id, after)))
            records.extend(page)
            if after is None:
                return records

    def steps_csv(self) -> str:
        """:meth:`steps` as CSV text (:func:`optserve_client._history.to_csv`'s columns)."""
        return _history.to_csv(self.steps())

    def delete(self) -> None:
        self.client.delete_session(self.id)
