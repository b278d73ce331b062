"""Tensors on the wire: step bodies and step replies in JSON or safetensors.

Both formats carry the same information. Safetensors (the default) sends raw bytes in
the session's dtype; JSON sends nested lists, whose floats Python writes as the shortest
decimal that reads back to the same float64, so no precision is lost either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from optserve_client import safetensors
from optserve_client.errors import ProtocolError

Wire = Literal["safetensors", "json"]
Returns = Literal["delta", "params", "none"]
UploadDtype = Literal["bfloat16", "float16"]
"""A narrower dtype gradients are rounded to for the upload (half the bytes of float32)."""
UPLOAD_DTYPES = ("bfloat16", "float16")
Body = bytes | list[bytes | memoryview]
"""A request body: bytes, or buffers (a header and views of arrays) sent in order."""

JSON = "application/json"
SAFETENSORS = safetensors.MEDIA_TYPE
PARAMS_PREFIX = "params/"
"""Safetensors step bodies name parameter values ``params/<name>``."""


def media_type(wire: Wire) -> str:
    return SAFETENSORS if wire == "safetensors" else JSON


@dataclass(frozen=True)
class StepResult:
    """What one step answered.

    ``deltas`` (``new - old``, to add to the client's copy) or ``params`` (the new values)
    hold one array per tensor, depending on what the step asked for. ``evaluate`` is true
    when the optimizer (LBFGS ask/tell) wants the loss and gradient at ``params`` next.
    """

    step: int
    lr: list[float]
    applied: bool
    evaluate: bool = False
    deltas: dict[str, np.ndarray] | None = None
    params: dict[str, np.ndarray] | None = None
    skipped: str | None = None
    replayed: bool = False
    etag: str | None = None
    metrics: dict[str, float] | None = None
    """An applied step's ``grad_norm``, ``update_norm``, ``param_norm``, ``loss``."""
    accumulated: int | None = None
    """With ``accumulate``: micro-batches in the session's running sum after this post."""
    of: int | None = None
    """With ``accumulate``: micro-batches per optimizer step."""
    extra: dict[str, Any] = field(default_factory=dict)


def as_array(value: npt.ArrayLike, dtype: np.dtype[Any], shape: tuple[int, ...], name: str) -> Any:
    """``value`` as a C-ordered array of ``dtype``; its shape must be the session's."""
    array = np.asarray(value, dtype=dtype, order="C")
    if array.shape != shape:
        raise ValueError(f"tensor {name!r}: shape {array.shape} != session shape {shape}")
    return array


def step_body(
    wire: Wire,
    grads: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray] | None,
    loss: float | None,
    upload_dtype: UploadDtype | None = None,
) -> Body:
    """The body of ``POST .../step``; arrays already in the session's dtype and shapes.

    Safetensors bodies are the header and views of the arrays (nothing joined), the
    gradients rounded to ``upload_dtype`` if given (parameter values never are; the
    connection refuses ``upload_dtype`` with the JSON wire).
    """
    if wire == "safetensors":
        tensors: dict[str, np.ndarray] = {n: _rounded(g, upload_dtype) for n, g in grads.items()}
        for name, value in (params or {}).items():
            tensors[PARAMS_PREFIX + name] = value
        metadata = {"loss": repr(float(loss))} if loss is not None else None
        bfloat16 = set(grads) if upload_dtype == "bfloat16" else ()
        return safetensors.encode_parts(tensors, metadata, bfloat16=bfloat16)
    body: dict[str, Any] = {"grads": {n: g.tolist() for n, g in grads.items()}}
    if params is not None:
        body["params"] = {n: p.tolist() for n, p in params.items()}
    if loss is not None:
        body["loss"] = float(loss)
    return json.dumps(body).encode()


def _rounded(grad: np.ndarray, upload_dtype: UploadDtype | None) -> np.ndarray:
    if upload_dtype == "bfloat16":
        return safetensors.to_bfloat16(grad)
    if upload_dtype == "float16":
        return grad.astype(np.float16)  # round to nearest even, as torch's .half()
    return grad


def parse_step(
    content_type: str,
    content: bytes | memoryview,
    returns: Returns,
    shapes: Mapping[str, tuple[int, ...]],
    dtype: np.dtype[Any],
) -> StepResult:
    """Decode a step reply of either media type into a :class:`StepResult`."""
    if _is_safetensors(content_type):
        tensors, meta = _decode(content)
        fields: dict[str, Any] = {k: _meta_value(v) for k, v in meta.items()}
        deltas: dict[str, np.ndarray] = {}
        params: dict[str, np.ndarray] = {}
        for name, array in tensors.items():
            if name.startswith(PARAMS_PREFIX):
                params[name[len(PARAMS_PREFIX) :]] = array
            elif returns == "params":
                params[name] = array
            else:
                deltas[name] = array
    else:
        fields = load_json(content)
        deltas = parse_tensors(fields.pop("deltas", None) or {}, shapes, dtype)
        params = parse_tensors(fields.pop("params", None) or {}, shapes, dtype)
    try:
        return StepResult(
            step=int(fields.pop("step")),
            lr=[float(x) for x in fields.pop("lr", [])],
            applied=bool(fields.pop("applied", True)),
            evaluate=bool(fields.pop("evaluate", False)),
            deltas={n: _cast(a, dtype) for n, a in deltas.items()} or None,
            params={n: _cast(a, dtype) for n, a in params.items()} or None,
            skipped=_optional_str(fields.pop("skipped", None)),
            replayed=bool(fields.pop("replayed", False)),
            metrics=_metrics(fields.pop("metrics", None)),
            accumulated=_optional_int(fields.pop("accumulated", None)),
            of=_optional_int(fields.pop("of", None)),
            extra=fields,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed step reply: {exc!r}") from None


def parse_tensors(
    raw: Any, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype[Any]
) -> dict[str, np.ndarray]:
    """``{name: nested list}`` from a JSON reply, as arrays of the session's shapes."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"expected an object of tensors, got {type(raw).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, values in raw.items():
        shape = shapes.get(name)
        try:
            array = np.asarray(values, dtype=dtype)
            out[name] = array.reshape(shape) if shape is not None else array
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"tensor {name!r} in reply: {exc}") from None
    return out


def parse_tensor_reply(
    content_type: str,
    content: bytes | memoryview,
    shapes: Mapping[str, tuple[int, ...]],
    dtype: np.dtype[Any],
) -> dict[str, np.ndarray]:
    """A ``{name: values}`` reply (``GET .../params``) of either media type."""
    if _is_safetensors(content_type):
        tensors, _ = _decode(content)
        return {n.removeprefix(PARAMS_PREFIX): _cast(a, dtype) for n, a in tensors.items()}
    document = load_json(content)
    # {"step": n, "params": {name: values}}; a bare {name: values} is read as well.
    return parse_tensors(document.get("params", document), shapes, dtype)


def load_json(content: bytes | memoryview) -> dict[str, Any]:
    try:
        value = json.loads(bytes(content) if isinstance(content, memoryview) else content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"reply is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _decode(content: bytes | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        # A reply read into its own buffer is handed over: its arrays are views of it.
        return safetensors.decode(content, copy=isinstance(content, bytes))
    except safetensors.SafetensorsError as exc:
        raise ProtocolError(f"reply is not valid safetensors: {exc}") from None


def _is_safetensors(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind in (SAFETENSORS, "application/octet-stream")


def _metrics(raw: Any) -> dict[str, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"metrics must be an object, got {raw!r}")
    return {str(k): float(v) for k, v in raw.items()}


def _optional_int(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def _meta_value(raw: str) -> Any:
    """Metadata values are strings; numbers, booleans and lists are JSON inside them."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _cast(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    return array if array.dtype == dtype else array.astype(dtype)


def _optional_str(value: Any) -> str | None:
    if value is None or value is False or value == "":
        return None
    return str(value)
