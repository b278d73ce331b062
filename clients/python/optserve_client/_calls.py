"""The HTTP requests of the optserve API, described without sending them.

Each function returns a :class:`Call`; the synchronous and the asynchronous client send
it with their own retry loop. Keeping the requests here means both clients speak exactly
the same protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from optserve_client import safetensors
from optserve_client._retry import Safety
from optserve_client._wire import JSON, SAFETENSORS, Returns, Wire, media_type


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    """Relative to the server's root, e.g. ``/v1/sessions``."""
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | Sequence[bytes | memoryview] | None = None
    """The body: bytes, or buffers sent in order without being joined."""
    params: dict[str, str] = field(default_factory=dict)
    safety: Safety = "idempotent"
    gone_ok_on_retry: bool = False
    """A DELETE whose first try may have succeeded: 404 on a retry means done."""


def _json_call(method: str, path: str, body: Any, safety: Safety = "idempotent") -> Call:
    return Call(
        method,
        path,
        headers={"content-type": JSON, "accept": JSON},
        content=json.dumps(body).encode(),
        safety=safety,
    )


def _session_path(session_id: str, suffix: str = "") -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"


def create(wire: Wire, config: Mapping[str, Any], initial: Mapping[str, np.ndarray] | None) -> Call:
    """``POST /v1/sessions``. With initial values the session holds the parameters."""
    if initial is None:
        return _json_call("POST", "/v1/sessions", dict(config), safety="unsent")
    if wire == "json":
        body = dict(config)
        body["params"] = {
            name: {**spec, "data": initial[name].tolist()}
            for name, spec in config["params"].items()
        }
        return _json_call("POST", "/v1/sessions", body, safety="unsent")
    return _post_safetensors(safetensors.encode(initial, {"session": json.dumps(dict(config))}))


def restore(checkpoint: bytes) -> Call:
    """``POST /v1/sessions`` with a checkpoint from ``GET .../state``: a new session."""
    return _post_safetensors(checkpoint)


def _post_safetensors(body: bytes) -> Call:
    """``POST /v1/sessions`` with a safetensors body: initial values or a checkpoint."""
    return Call(
        "POST",
        "/v1/sessions",
        headers={"content-type": SAFETENSORS, "accept": JSON},
        content=body,
        safety="unsent",
    )


def get(session_id: str) -> Call:
    return Call("GET", _session_path(session_id), headers={"accept": JSON})


def list_page(limit: int | None, after: str | None) -> Call:
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if after is not None:
        params["after"] = after
    return Call("GET", "/v1/sessions", headers={"accept": JSON}, params=params)


def delete(session_id: str) -> Call:
    return Call("DELETE", _session_path(session_id), gone_ok_on_retry=True)


def step(
    session_id: str,
    wire: Wire,
    body: bytes | Sequence[bytes | memoryview],
    returns: Returns,
    idempotency_key: str,
    if_match: int | None,
) -> Call:
    headers = {
        "content-type": media_type(wire),
        "accept": media_type(wire),
        "idempotency-key": idempotency_key,
    }
    if if_match is not None:
        headers["if-match"] = f'"{if_match}"'
    return Call(
        "POST",
        _session_path(session_id, "/step"),
        headers=headers,
        content=body,
        params={"return": returns},
    )


def params(session_id: str, wire: Wire, evaluation: bool = False, average: bool = False) -> Call:
    return Call(
        "GET",
        _session_path(session_id, "/params"),
        headers={"accept": media_type(wire)},
        params={
            **({"eval": "true"} if evaluation else {}),
            **({"average": "true"} if average else {}),
        },
    )


def state(session_id: str) -> Call:
    return Call("GET", _session_path(session_id, "/state"), headers={"accept": SAFETENSORS})


def schedule_step(session_id: str, metric: float | None) -> Call:
    body = {} if metric is None else {"metric": float(metric)}
    return _json_call("POST", _session_path(session_id, "/schedule/step"), body, safety="unsent")


def edit_group(
    session_id: str,
    index: int,
    values: Mapping[str, Any],
    reason: str | None,
    if_match: int | None,
) -> Call:
    """``PATCH .../param_groups/{index}``: set hyperparameters of one group."""
    body = {**values, **({"reason": reason} if reason is not None else {})}
    call = _json_call("PATCH", _session_path(session_id, f"/param_groups/{int(index)}"), body)
    if if_match is not None:
        call.headers["if-match"] = f'"{if_match}"'
    # Setting the same values twice is the same as once: safe to retry.
    return call


def add_group(
    session_id: str,
    specs: Mapping[str, Any],
    initial: Mapping[str, np.ndarray] | None,
    options: Mapping[str, Any],
    reason: str | None,
) -> Call:
    """``POST .../param_groups``: torch's ``add_param_group``."""
    params = {
        name: {**spec, **({"data": initial[name].tolist()} if initial is not None else {})}
        for name, spec in specs.items()
    }
    body = {"params": params, **options, **({"reason": reason} if reason is not None else {})}
    return _json_call("POST", _session_path(session_id, "/param_groups"), body, safety="unsent")


def changes(session_id: str, after: int | None) -> Call:
    query = {"limit": "1000", **({"after": str(after)} if after is not None else {})}
    return Call(
        "GET", _session_path(session_id, "/changes"), headers={"accept": JSON}, params=query
    )


def steps(session_id: str, after: int | None) -> Call:
    """``GET .../steps``: a page of the step history after event ``after``."""
    query = {"limit": "1000", **({"after": str(after)} if after is not None else {})}
    return Call("GET", _session_path(session_id, "/steps"), headers={"accept": JSON}, params=query)


def optimizers() -> Call:
    return Call("GET", "/v1/optimizers", headers={"accept": JSON})


def schedules() -> Call:
    return Call("GET", "/v1/schedules", headers={"accept": JSON})


def preview(
    optimizer: Mapping[str, Any],
    schedule: Mapping[str, Any] | None,
    steps: int,
    param_groups: Sequence[Mapping[str, Any]] | None,
) -> Call:
    body: dict[str, Any] = {"optimizer": dict(optimizer), "steps": steps}
    if schedule is not None:
        body["schedule"] = dict(schedule)
    if param_groups is not None:
        body["param_groups"] = [dict(g) for g in param_groups]
    return _json_call("POST", "/v1/schedules/preview", body)


def health(path: str) -> Call:
    return Call("GET", path)


__all__ = [
    "Call",
    "create",
    "delete",
    "get",
    "health",
    "list_page",
    "optimizers",
    "params",
    "preview",
    "restore",
    "schedule_step",
    "schedules",
    "state",
    "step",
]
