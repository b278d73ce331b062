"""An in-memory stand-in for the optserve HTTP API, served through httpx.MockTransport.

It speaks the wire protocol of DESIGN.md §3 (JSON and safetensors bodies, idempotency
keys, If-Match, return modes, problem documents) with one optimizer, plain SGD with
weight decay per param group (``delta = -lr * (g + weight_decay * p)``), so the client's
request framing, parsing and retry loop can be tested without a server process.
Tensors are encoded with the ``safetensors`` package, not the client's codec, so the
two implementations check each other.

``FakeServer.fail_next(...)`` queues failures (a transport exception or an error status)
that the next requests get before the fake handles them; ``lose_next_replies`` makes it
apply requests and then drop the replies. Every request is recorded.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

SAFETENSORS = "application/vnd.optserve.safetensors"
PROBLEM = "application/problem+json"


def st_metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    return dict(meta)


@dataclass
class FakeSession:
    id: str
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtype: np.dtype[Any]
    params: dict[str, np.ndarray] | None
    step: int = 0
    replies: dict[str, tuple[str, httpx.Response]] = field(default_factory=dict)

    def groups(self) -> list[dict[str, Any]]:
        """Unlisted tensors first, then each ``param_groups`` entry, as the server orders them."""
        base = {"lr": 1e-3, "weight_decay": 0.0}
        base.update({k: v for k, v in self.config["optimizer"].items() if k != "name"})
        entries = self.config.get("param_groups") or []
        listed = {n for g in entries for n in g["params"]}
        groups = []
        unlisted = [n for n in self.shapes if n not in listed]
        if unlisted:
            groups.append({"params": unlisted, **base})
        groups.extend({**base, **g} for g in entries)
        return groups

    def hparams(self, name: str) -> dict[str, Any]:
        return next(g for g in self.groups() if name in g["params"])

    @property
    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.groups()]

    def document(self) -> dict[str, Any]:
        groups = self.groups()
        return {
            "id": self.id,
            "step": self.step,
            "lr": self.lrs,
            "optimizer": {"name": "SGD", **{k: v for k, v in groups[-1].items() if k != "params"}},
            "param_groups": groups,
            "tensors": {n: {"shape": list(s)} for n, s in self.shapes.items()},
            "holds_params": self.params is not None,
            "needs_params": any(g["weight_decay"] for g in groups),
            "dtype": self.dtype.name,
        }


Failure = httpx.TransportError | int | tuple[int, dict[str, Any], dict[str, str]]


class FakeServer:
    def __init__(self, api_key: str | None = None, page_size: int = 2) -> None:
        self.api_key = api_key
        self.page_size = page_size
        self.sessions: dict[str, FakeSession] = {}
        self.requests: list[httpx.Request] = []
        self.failures: deque[Failure] = deque()
        self.lose_replies = 0

    def fail_next(self, *failures: Failure) -> None:
        self.failures.extend(failures)

    def lose_next_replies(self, count: int = 1) -> None:
        """Handle the next ``count`` requests fully, then drop their replies."""
        self.lose_replies = count

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def async_transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            await request.aread()
            return self.handle(request)

        return httpx.MockTransport(handle)

    # Dispatch

    def handle(self, request: httpx.Request) -> httpx.Response:
        response = self.dispatch(request)
        if self.lose_replies:
            self.lose_replies -= 1
            raise httpx.ReadError("reply lost")
        return response

    def dispatch(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            failure = self.failures.popleft()
            if isinstance(failure, Exception):
                raise failure
            status, extra, headers = failure if isinstance(failure, tuple) else (failure, {}, {})
            return problem(status, "injected", **extra, headers=headers)
        path = request.url.path
        if path in ("/healthz", "/readyz"):
            return httpx.Response(200, json={"status": "ok"})
        if self.api_key is not None and (
            request.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            return problem(401, "unauthorized", headers={"www-authenticate": "Bearer"})
        parts = path.strip("/").split("/")
        if parts[:2] != ["v1", "sessions"]:
            return problem(404, "not-found")
        if len(parts) == 2:
            return self.create(request) if request.method == "POST" else self.list(request)
        session = self.sessions.get(parts[2])
        if session is None:
            return problem(404, "session-not-found", detail=f"no session {parts[2]}")
        action = parts[3] if len(parts) > 3 else ""
        if action == "" and request.method == "GET":
            return httpx.Response(200, json=session.document(), headers=etag(session))
        if action == "" and request.method == "DELETE":
            del self.sessions[session.id]
            return httpx.Response(204)
        if action == "step":
            return self.step(session, request)
        if action == "params":
            return self.get_params(session, request)
        return problem(404, "not-found")

    # Endpoints

    def create(self, request: httpx.Request) -> httpx.Response:
        content_type = request.headers.get("content-type", "")
        initial: dict[str, np.ndarray] | None = None
        if content_type == SAFETENSORS:
            config = json.loads(st_metadata(request.content)["session"])
            initial = dict(st_load(request.content))
        else:
            config = json.loads(request.content)
        specs = config["params"]
        dtype = np.dtype(config.get("dtype", "float32"))
        if any("data" in s for s in specs.values()):
            initial = {n: np.asarray(s["data"], dtype=dtype) for n, s in specs.items()}
        shapes = {n: tuple(s["shape"]) for n, s in specs.items()}
        if float(config["optimizer"].get("lr", 1e-3)) < 0:  # the one validation it does
            return problem(
                422,
                "invalid-hyperparameter",
                errors=[{"field": "optimizer.lr", "message": "Invalid learning rate"}],
            )
        held = (
            {n: a.astype(dtype).reshape(shapes[n]) for n, a in initial.items()} if initial else None
        )
        session = FakeSession(f"s{len(self.requests)}", config, shapes, dtype, held)
        self.sessions[session.id] = session
        return httpx.Response(
            201,
            json=session.document(),
            headers={"location": f"/v1/sessions/{session.id}", **etag(session)},
        )

    def list(self, request: httpx.Request) -> httpx.Response:
        ids = sorted(self.sessions)
        after = request.url.params.get("after")
        if after is not None:
            ids = [i for i in ids if i > after]
        page = ids[: self.page_size]
        more = len(ids) > self.page_size
        return httpx.Response(
            200,
            json={
                "sessions": [self.sessions[i].document() for i in page],
                "next": page[-1] if more else None,
            },
        )

    def step(self, session: FakeSession, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("idempotency-key")
        fingerprint = request.content.hex() + request.url.query.decode()
        if key is not None and key in session.replies:
            stored_fingerprint, stored = session.replies[key]
            if stored_fingerprint != fingerprint:
                return problem(422, "idempotency-key-reused")
            return httpx.Response(
                stored.status_code,
                content=stored.content,
                headers={**stored.headers, "idempotent-replayed": "true"},
            )
        if_match = request.headers.get("if-match")
        if if_match is not None and if_match != f'"{session.step}"':
            return problem(412, "precondition-failed", headers=etag(session))
        grads, params, loss = self.read_step(session, request)
        returns = request.url.params.get("return", "delta")
        if session.params is not None:
            params = session.params
        if params is None and (returns == "params" or session.document()["needs_params"]):
            return problem(422, "params-required")
        deltas = {}
        for n, g in grads.items():
            hp = session.hparams(n)
            decay = hp["weight_decay"] * params[n] if hp["weight_decay"] and params else 0.0
            # asarray: arithmetic on 0-d arrays gives numpy scalars.
            deltas[n] = np.asarray(-hp["lr"] * (g + decay), dtype=session.dtype)
        new_params = (
            {n: np.asarray(params[n] + deltas[n]) for n in deltas} if params is not None else None
        )
        if session.params is not None and new_params is not None:
            session.params = new_params
        session.step += 1
        out = {"delta": deltas, "params": new_params, "none": {}}[returns] or {}
        meta = {"step": session.step, "lr": session.lrs, "applied": True, "loss_seen": loss}
        if request.headers.get("accept") == SAFETENSORS:
            text_meta = {k: json.dumps(v) for k, v in meta.items()}
            response = httpx.Response(
                200,
                content=st_save(out, metadata=text_meta),
                headers={"content-type": SAFETENSORS, **etag(session)},
            )
        else:
            key_name = "params" if returns == "params" else "deltas"
            body = {**meta, key_name: {n: a.tolist() for n, a in out.items()}}
            response = httpx.Response(200, json=body, headers=etag(session))
        if key is not None:
            session.replies[key] = (fingerprint, response)
        return response

    def read_step(
        self, session: FakeSession, request: httpx.Request
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, float | None]:
        if request.headers.get("content-type") == SAFETENSORS:
            tensors = st_load(request.content)
            meta = st_metadata(request.content)
            grads = {n: a for n, a in tensors.items() if not n.startswith("params/")}
            params = {n[7:]: a for n, a in tensors.items() if n.startswith("params/")}
            loss = float(meta["loss"]) if "loss" in meta else None
        else:
            body = json.loads(request.content)
            grads = {n: np.asarray(v) for n, v in body["grads"].items()}
            params = {n: np.asarray(v) for n, v in body.get("params", {}).items()}
            loss = body.get("loss")
        cast = {
            n: np.asarray(a, dtype=session.dtype).reshape(session.shapes[n])
            for n, a in grads.items()
        }
        cast_params = {
            n: np.asarray(a, dtype=session.dtype).reshape(session.shapes[n])
            for n, a in params.items()
        }
        return cast, (cast_params or None), loss

    def get_params(self, session: FakeSession, request: httpx.Request) -> httpx.Response:
        if session.params is None:
            return problem(409, "no-params")
        if request.headers.get("accept") == SAFETENSORS:
            return httpx.Response(
                200, content=st_save(session.params), headers={"content-type": SAFETENSORS}
            )
        return httpx.Response(200, json={n: a.tolist() for n, a in session.params.items()})


def etag(session: FakeSession) -> dict[str, str]:
    return {"etag": f'"{session.step}"'}


def problem(
    status: int, slug: str, headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    body = {
        "type": f"/problems/{slug}",
        "title": slug.replace("-", " "),
        "status": status,
        **extra,
    }
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": PROBLEM, **(headers or {})},
    )
