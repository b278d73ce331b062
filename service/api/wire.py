"""Request bodies to domain values and domain values to response bodies, per wire format.

Tensor payloads never pass through pydantic: JSON bodies are parsed by ``json`` and turned
into arrays by ``service.codec.json_tensors``; safetensors bodies are decoded zero-copy.
The sessions layer casts to the session's dtype and checks names and shapes, so this module
only has to build arrays and report what cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from service.api.media import Wire
from service.api.problems import InvalidRequest
from service.codec import json_tensors, safetensors, strict_json
from service.codec.errors import MalformedBody
from service.codec.json_tensors import array_from_json, array_to_json
from service.sessions.models import StepReply

PARAMS_PREFIX = "params/"
STEP_KEYS = frozenset({"grads", "params", "loss"})
_FLOAT64 = np.dtype(np.float64)


def parse_json(body: bytes, what: str = "request body") -> Any:
    """Parse JSON, reporting every failure as a malformed body (400)."""
    try:
        return json_tensors.parse(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedBody(f"{what} is not valid JSON: {exc}") from None


def parse_json_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    value = parse_json(body, what)
    if not isinstance(value, dict):
        raise MalformedBody(f"{what} must be a JSON object")
    return value


def reject_unknown_fields(
    document: dict[str, Any], known: frozenset[str] | set[str], what: str = "fields"
) -> None:
    """An InvalidRequest naming every field of ``document`` outside ``known``, sorted."""
    unknown = sorted(set(document) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown {what}: {', '.join(unknown)}",
            [(name, "unknown field") for name in unknown],
        )


def finite_number(value: Any) -> bool:
    """Whether a JSON value is a number that is finite as a float (an integer too large
    for a float is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{field} must be a number", [(field, "must be a number")])
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest(f"{field} is out of range", [(field, "out of range")]) from None


@dataclass
class StepBody:
    """A step's tensors as sent; ``bare`` is a lone gradient for a one-tensor session."""

    grads: dict[str, np.ndarray]
    bare: np.ndarray | None
    params: dict[str, np.ndarray] | None
    loss: float | None


def _tensor_map(raw: Any, field: str, check_bools: bool) -> dict[str, np.ndarray]:
    if not isinstance(raw, dict):
        raise InvalidRequest(
            f"{field} must be an object of tensor name to values",
            [(field, "must be an object of tensor name to values")],
        )
    return {
        name: array_from_json(values, None, _FLOAT64, f"{field}.{name}", check_bools=check_bools)
        for name, values in raw.items()
    }


def step_from_json(body: bytes) -> StepBody:
    document = parse_json_object(body)
    reject_unknown_fields(document, STEP_KEYS, "step fields")
    if "grads" not in document:
        raise InvalidRequest("a step needs 'grads'", [("grads", "required")])
    # Booleans are the one non-number numpy would accept silently; only scan for them
    # when the text could hold one.
    check_bools = json_tensors.may_hold_bools(body)
    raw_grads = document["grads"]
    bare = None
    grads: dict[str, np.ndarray] = {}
    if isinstance(raw_grads, list):
        bare = array_from_json(raw_grads, None, _FLOAT64, "grads", check_bools=check_bools)
    else:
        grads = _tensor_map(raw_grads, "grads", check_bools)
    raw_params = document.get("params")
    params = None if raw_params is None else _tensor_map(raw_params, "params", check_bools)
    return StepBody(grads, bare, params, _number(document.get("loss"), "loss"))


def step_from_safetensors(body: bytes | memoryview, max_tensors: int) -> StepBody:
    tensors, metadata = safetensors.decode(body, max_tensors=max_tensors)
    grads: dict[str, np.ndarray] = {}
    params: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if name.startswith(PARAMS_PREFIX):
            params[name[len(PARAMS_PREFIX) :]] = array
        else:
            grads[name] = array
    loss = None
    if "loss" in metadata:
        try:
            loss = float(metadata["loss"])
        except ValueError:
            raise InvalidRequest(
                "__metadata__ loss must be a number", [("loss", "must be a number")]
            ) from None
    return StepBody(grads, None, params or None, loss)


def _prefix(wire: Wire, want: str) -> bytes:
    return wire.value.encode() + b"\n" + want.encode() + b"\n"


def fingerprinter(wire: Wire, want: str) -> xxhash.xxh3_128:
    """:func:`fingerprint` of a body still arriving: ``update`` it with each chunk, then
    read ``hexdigest``. Hashing each chunk as it lands reads it while it is in the CPU's
    cache, instead of streaming the whole body from memory again (2.5 ms at 40 MB)."""
    digest = xxhash.xxh3_128()
    digest.update(_prefix(wire, want))
    return digest


def fingerprint(body: bytes | memoryview, wire: Wire, want: str) -> str:
    """What identifies a step request for idempotency: body, its type, the return mode.

    XXH3-128, not a cryptographic hash: it tells a retry from a different request sent
    under the same key by mistake. Forging a collision would only let a tenant's client
    replay its own earlier answer to itself; keys are scoped to the tenant. At 25+ GB/s
    it costs 0.05 ms on a 4 MB body where sha256 cost 2 ms.
    """
    digest = fingerprinter(wire, want)
    digest.update(body)
    return digest.hexdigest()


def sha256_fingerprint(body: bytes | memoryview, wire: Wire, want: str) -> str:
    """:func:`fingerprint` as servers before XXH3 computed it: keys they recorded are
    compared with this, so that their retries still replay."""
    digest = hashlib.sha256(_prefix(wire, want))
    digest.update(body)
    return digest.hexdigest()


def _tensors_json(tensors: dict[str, np.ndarray]) -> bytes:
    parts = [
        json.dumps(name).encode() + b":" + array_to_json(array) for name, array in tensors.items()
    ]
    return b"{" + b",".join(parts) + b"}"


def _lr_json(lr: list[float]) -> str:
    return strict_json.dumps([float(x) for x in lr], separators=(", ", ": "))


def step_reply_json(reply: StepReply, want: str) -> bytes:
    head = f'{{"step":{reply.step},"lr":{_lr_json(reply.lr)},"applied":{json.dumps(reply.applied)}'
    if reply.evaluate:
        head += ',"evaluate":true'
    if reply.skipped is not None:
        head += f',"skipped":{json.dumps(reply.skipped)}'
    if reply.metrics is not None:
        head += f',"metrics":{strict_json.dumps(reply.metrics)}'
    if reply.of is not None:
        head += f',"accumulated":{reply.accumulated},"of":{reply.of}'
    if reply.tensors is None:
        return head.encode() + b"}"
    key = b',"params":' if want == "params" else b',"deltas":'
    return head.encode() + key + _tensors_json(reply.tensors) + b"}"


def step_reply_metadata(reply: StepReply) -> dict[str, str]:
    meta = {
        "step": str(reply.step),
        "lr": _lr_json(reply.lr),
        "applied": json.dumps(reply.applied),
    }
    if reply.evaluate:
        meta["evaluate"] = "true"
    if reply.skipped is not None:
        meta["skipped"] = reply.skipped
    if reply.metrics is not None:
        meta["metrics"] = strict_json.dumps(reply.metrics)
    if reply.of is not None:
        meta["accumulated"] = str(reply.accumulated)
        meta["of"] = str(reply.of)
    return meta


def step_reply_safetensors(reply: StepReply) -> list[bytes | memoryview]:
    """The reply's header and views of its tensors (``safetensors.encode_parts``)."""
    return safetensors.encode_parts(reply.tensors or {}, step_reply_metadata(reply))


def tensors_json_document(step: int, tensors: dict[str, np.ndarray]) -> bytes:
    """``GET .../params`` as JSON: ``{"step": n, "params": {name: nested values}}``."""
    return f'{{"step":{step},"params":'.encode() + _tensors_json(tensors) + b"}"


def session_config_from_json(
    document: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Split a create body into the config (no tensor data) and the initial values, if any.

    ``data`` may be nested to the tensor's shape or flat. If any tensor has ``data``, all
    must: the session then holds its parameters.
    """
    raw_params = document.get("params")
    if not isinstance(raw_params, dict):
        return document, None  # the config check names what is wrong with it
    with_data = [
        name for name, spec in raw_params.items() if isinstance(spec, dict) and "data" in spec
    ]
    if not with_data:
        return document, None
    missing = [name for name in raw_params if name not in with_data]
    if missing:
        raise InvalidRequest(
            "if any tensor has 'data', every tensor must",
            [(f"params.{name}.data", "required when any tensor has data") for name in missing],
        )
    dtype = np.dtype(np.float64 if document.get("dtype") == "float64" else np.float32)
    values: dict[str, np.ndarray] = {}
    config_params: dict[str, Any] = {}
    for name, spec in raw_params.items():
        shape = _shape_or_none(spec.get("shape"))
        values[name] = array_from_json(spec["data"], shape, dtype, f"params.{name}.data")
        config_params[name] = {k: v for k, v in spec.items() if k != "data"}
    return {**document, "params": config_params}, values


def _shape_or_none(raw: Any) -> tuple[int, ...] | None:
    valid = isinstance(raw, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    )
    return tuple(raw) if valid and math.prod(raw) < 2**62 else None
