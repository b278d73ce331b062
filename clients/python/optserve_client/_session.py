"""What the sync and async session objects share: the session document and step framing."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import httpx
import numpy as np
import numpy.typing as npt

from optserve_client import _calls, _documents
from optserve_client._wire import (
    Returns,
    StepResult,
    UploadDtype,
    Wire,
    as_array,
    parse_step,
    parse_tensor_reply,
    step_body,
)
from optserve_client.errors import ProtocolError

TensorsIn = Mapping[str, npt.ArrayLike] | npt.ArrayLike
"""Gradients or parameters: ``{name: array}``, or one bare array for one-tensor sessions."""

ParamsSpec = Mapping[str, "Sequence[int] | npt.ArrayLike"]


def session_config(
    *,
    optimizer: Mapping[str, Any],
    params: ParamsSpec,
    schedule: Mapping[str, Any] | None,
    param_groups: Sequence[Mapping[str, Any]] | None,
    dtype: str,
    clip_grad_norm: Mapping[str, Any] | float | None,
    clip_grad_value: float | Mapping[str, Any] | None,
    nonfinite: str | None,
    labels: Mapping[str, str] | None,
    hold_params: bool | None,
    missing_grads: str | None = None,
    accumulate: Mapping[str, Any] | None = None,
    averaging: Mapping[str, Any] | None = None,
    aggregation: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """The create body (without tensor data) and the initial values, if the session holds them.

    ``params`` maps each name to a shape (a tuple of ints) or an array (anything numpy
    reads except a plain list, which could be either). Arrays give the shapes and, unless
    ``hold_params=False``, the initial values (the session then holds the parameters).
    ``hold_params=True`` needs every value to be an array.
    """
    np_dtype = np.dtype(dtype)
    shapes: dict[str, dict[str, list[int]]] = {}
    initial: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if _is_shape(value):
            shapes[name] = {"shape": [int(d) for d in value]}
        elif isinstance(value, list):
            raise TypeError(
                f"params[{name!r}]: a list is ambiguous; give a shape as a tuple, "
                "or initial values as an array"
            )
        else:
            array = np.asarray(value, dtype=np_dtype, order="C")
            shapes[name] = {"shape": list(array.shape)}
            initial[name] = array
    if hold_params and len(initial) != len(shapes):
        raise ValueError("hold_params=True needs an initial array for every tensor")
    if initial and len(initial) != len(shapes) and hold_params is not False:
        missing = sorted(set(shapes) - set(initial))
        raise ValueError(f"give initial values for every tensor or none; missing: {missing}")
    config: dict[str, Any] = {"optimizer": dict(optimizer), "params": shapes, "dtype": dtype}
    if schedule is not None:
        config["schedule"] = dict(schedule)
    if param_groups:
        config["param_groups"] = [dict(g) for g in param_groups]
    if clip_grad_norm is not None:
        config["clip_grad_norm"] = (
            {"max_norm": float(clip_grad_norm)}
            if isinstance(clip_grad_norm, int | float)
            else dict(clip_grad_norm)
        )
    if clip_grad_value is not None:
        config["clip_grad_value"] = (
            {"clip_value": float(clip_grad_value)}
            if isinstance(clip_grad_value, int | float)
            else dict(clip_grad_value)
        )
    if nonfinite is not None:
        config["nonfinite"] = nonfinite
    if missing_grads is not None:
        config["missing_grads"] = missing_grads
    if accumulate is not None:
        config["accumulate"] = dict(accumulate)
    if averaging is not None:
        config["averaging"] = dict(averaging)
    if aggregation is not None:
        config["aggregation"] = dict(aggregation)
    if labels:
        config["labels"] = dict(labels)
    holds = bool(initial) and hold_params is not False
    return config, (initial if holds else None)


def _is_shape(value: Any) -> TypeGuard[tuple[int, ...]]:
    """A tuple of ints is a shape; anything else (lists included) is tensor data."""
    return isinstance(value, tuple) and all(isinstance(d, int | np.integer) for d in value)


class SessionView:
    """A session's document, kept current by every step; shared by both session types."""

    def __init__(
        self, document: Mapping[str, Any], wire: Wire, upload_dtype: UploadDtype | None = None
    ) -> None:
        self.wire: Wire = wire
        self.upload_dtype: UploadDtype | None = upload_dtype
        self._update(document)

    def _update(self, document: Mapping[str, Any]) -> None:
        try:
            self.document: dict[str, Any] = dict(document)
            self.id: str = str(document["id"])
            tensors = document["tensors"]
            self.shapes: dict[str, tuple[int, ...]] = {
                name: tuple(int(d) for d in spec["shape"]) for name, spec in tensors.items()
            }
            self.dtype: np.dtype[Any] = np.dtype(document.get("dtype", "float32"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed session document: {exc!r}") from None

    def _absorb(self, document: Any) -> None:
        """Take in a full session document, or just the ``step``/``lr`` of a smaller reply."""
        if isinstance(document, dict) and "tensors" in document:
            self._update(document)
        elif isinstance(document, dict):
            self.document.update({k: v for k, v in document.items() if k in ("step", "lr")})

    @property
    def step_count(self) -> int:
        """Optimizer steps applied so far (the session's ``step``)."""
        return int(self.document.get("step", 0))

    @property
    def lr(self) -> list[float]:
        """The current learning rate of each parameter group."""
        return [float(x) for x in self.document.get("lr", [])]

    @property
    def holds_params(self) -> bool:
        return bool(self.document.get("holds_params", False))

    @property
    def etag(self) -> str:
        return f'"{self.step_count}"'

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} step={self.step_count} lr={self.lr}>"

    @property
    def skips_missing(self) -> bool:
        """Whether a step may leave tensors out (the session's ``missing_grads: "skip"``)."""
        return self.document.get("missing_grads") == "skip"

    def _named(self, values: TensorsIn, what: str) -> dict[str, np.ndarray]:
        if not isinstance(values, Mapping):
            if len(self.shapes) != 1:
                raise ValueError(f"{what}: pass {{name: array}}; this session has several tensors")
            values = {next(iter(self.shapes)): values}
        unknown = sorted(set(values) - set(self.shapes))
        missing = [] if self.skips_missing else sorted(set(self.shapes) - set(values))
        if unknown or missing:
            raise ValueError(f"{what}: unknown tensors {unknown}, missing tensors {missing}")
        return {
            name: as_array(values[name], self.dtype, shape, name)
            for name, shape in self.shapes.items()
            if name in values
        }

    def _edit_call(
        self, index: int, values: Mapping[str, Any], reason: str | None, if_match: int | None
    ) -> _calls.Call:
        return _calls.edit_group(self.id, index, values, reason, if_match)

    def _add_call(
        self, params: ParamsSpec, options: Mapping[str, Any], reason: str | None
    ) -> _calls.Call:
        specs, initial = session_config(
            optimizer={},
            params=params,
            schedule=None,
            param_groups=None,
            dtype=str(self.dtype),
            clip_grad_norm=None,
            clip_grad_value=None,
            nonfinite=None,
            labels=None,
            hold_params=self.holds_params,
        )
        return _calls.add_group(self.id, specs["params"], initial, options, reason)

    def _step_call(
        self,
        grads: TensorsIn,
        params: TensorsIn | None,
        loss: float | None,
        returns: Returns,
        if_match: int | bool | None,
        idempotency_key: str | None,
    ) -> _calls.Call:
        body = step_body(
            self.wire,
            self._named(grads, "grads"),
            self._named(params, "params") if params is not None else None,
            loss,
            self.upload_dtype,
        )
        expected: int | None
        if if_match is True:
            expected = self.step_count
        elif if_match is None or if_match is False:
            expected = None
        else:
            expected = int(if_match)
        return _calls.step(
            self.id,
            self.wire,
            body,
            returns,
            idempotency_key or uuid.uuid4().hex,
            expected,
        )

    def _tensors(self, response: httpx.Response, body: bytes | memoryview) -> dict[str, np.ndarray]:
        """The ``{name: array}`` reply of ``GET .../params``, in this session's dtype."""
        return parse_tensor_reply(
            response.headers.get("content-type", ""), body, self.shapes, self.dtype
        )

    def _absorb_reply(self, response: httpx.Response) -> None:
        """Take in what a reply says of the session, if it says anything."""
        if response.content:
            self._absorb(_documents.json_body(response))

    def _step_result(
        self, response: httpx.Response, body: bytes | memoryview, returns: Returns
    ) -> StepResult:
        result = parse_step(
            response.headers.get("content-type", ""),
            body,
            returns,
            self.shapes,
            self.dtype,
        )
        result = dataclasses.replace(
            result,
            replayed=result.replayed or _truthy(response.headers.get("idempotent-replayed")),
            etag=response.headers.get("etag"),
        )
        # A replayed answer may be older than what the session has seen since.
        if result.step >= self.step_count:
            self.document["step"] = result.step
            if result.lr:
                self.document["lr"] = result.lr
        return result


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes")
