"""A federated client of an optserve session: fetch the round's params, train, submit.

>>> from optserve_client import Client
>>> from optserve_client.federated import FederatedClient
>>> with Client("http://127.0.0.1:8000") as client:               # doctest: +SKIP
...     me = FederatedClient(client, session_id, "hospital-3")
...     me.run(train, rounds=10)    # train(round) -> (new params, num_examples)

Every update carries an ``Idempotency-Key`` (a fresh one per update, reused by its
retries), so a request lost on the way back is retried and counted once. FedProx clients
read ``Round.proximal_mu`` and add :func:`proximal_term` to their loss (or
:func:`proximal_gradient` to their gradient).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from optserve_client import safetensors
from optserve_client._calls import Call, _session_path
from optserve_client._wire import JSON, SAFETENSORS, load_json
from optserve_client.client import Client

__all__ = ["FederatedClient", "Round", "proximal_gradient", "proximal_term"]

MAX_WAIT_S = 60.0
"""The server's longest long poll."""


@dataclass(frozen=True)
class Round:
    """What a client trains from: the params of a round (or, in async mode, a version)."""

    number: int | None
    """The round (None in async mode)."""
    version: int
    """The session's step: the ``base_version`` of an asynchronous update."""
    params: dict[str, np.ndarray]
    proximal_mu: float = 0.0
    """FedProx's mu: add ``mu/2 * ||w - params||^2`` to the local loss (0: plain FedAvg)."""
    client_lr: float | None = None
    """``eta_l`` of Flower's adaptive presets, for the client's optimizer."""


Trainer = Callable[[Round], tuple[Mapping[str, np.ndarray], int]]
"""Local training: the round in, the client's new params and its number of examples out."""


class FederatedClient:
    """One client (``client_id``) of the federated session ``session_id``."""

    def __init__(self, client: Client, session_id: str, client_id: str) -> None:
        self._client = client
        self.session_id = session_id
        self.client_id = client_id

    def _path(self, suffix: str) -> str:
        return _session_path(self.session_id, suffix)

    def round_document(self) -> dict[str, Any]:
        """``GET .../round``: where aggregation stands."""
        response = self._client.send(Call("GET", self._path("/round"), {"accept": JSON}))
        return load_json(response.content)

    def fetch(self, after: int | None = None, wait: float = 0.0) -> Round | None:
        """The params to train from; with ``after``, a long poll of up to ``wait`` seconds
        for the round (async: version) after it. None when nothing newer came."""
        query: dict[str, str] = {}
        if after is not None:
            query = {"after": str(after), "wait": str(min(max(wait, 0.0), MAX_WAIT_S))}
        call = Call("GET", self._path("/round/params"), {"accept": SAFETENSORS}, params=query)
        response = self._client.send(call)
        if response.status_code == 204:
            return None
        tensors, metadata = safetensors.decode(response.content)
        document = self.round_document()
        number = metadata.get("round") or None
        return Round(
            number=None if number is None else int(number),
            version=int(metadata["version"]),
            params=tensors,
            proximal_mu=float(document.get("proximal_mu") or 0.0),
            client_lr=document.get("client_lr"),
        )

    def next_round(self, after: int | None, timeout: float = 600.0) -> Round:
        """The first round after ``after`` (None: the current one), polling until it opens."""
        if after is None:
            current = self.fetch()
            assert current is not None  # without ``after`` the server always answers
            return current
        give_up = time.monotonic() + timeout
        while (left := give_up - time.monotonic()) > 0:
            fetched = self.fetch(after, wait=min(left, 30.0))
            if fetched is not None:
                return fetched
        raise TimeoutError(f"no round after {after} within {timeout} s")

    def submit(
        self,
        trained_from: Round,
        *,
        params: Mapping[str, np.ndarray] | None = None,
        delta: Mapping[str, np.ndarray] | None = None,
        num_examples: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Send new ``params`` (or the ``delta`` from ``trained_from.params``) for the round
        (async: version) ``trained_from`` came from. Retried with one key: answered once."""
        if (params is None) == (delta is None):
            raise ValueError("give exactly one of params and delta")
        form, tensors = ("params", params) if params is not None else ("delta", delta)
        assert tensors is not None
        metadata = {"client_id": self.client_id}
        if trained_from.number is not None:
            metadata["round"] = str(trained_from.number)
        else:
            metadata["base_version"] = str(trained_from.version)
        if num_examples is not None:
            metadata["num_examples"] = str(num_examples)
        body = safetensors.encode(
            {f"{form}/{name}": np.asarray(v) for name, v in tensors.items()}, metadata
        )
        headers = {
            "content-type": SAFETENSORS,
            "accept": JSON,
            "idempotency-key": idempotency_key or uuid.uuid4().hex,
        }
        response = self._client.send(Call("POST", self._path("/updates"), headers, body))
        return load_json(response.content)

    def train_round(
        self, train: Trainer, after: int | None = None, timeout: float = 600.0
    ) -> tuple[Round, dict[str, Any]]:
        """Wait for the round after ``after``, train on it, submit; the round and the reply."""
        current = self.next_round(after, timeout)
        params, num_examples = train(current)
        reply = self.submit(current, params=params, num_examples=num_examples)
        return current, reply

    def run(self, train: Trainer, rounds: int, timeout: float = 600.0) -> list[dict[str, Any]]:
        """Take part in ``rounds`` consecutive rounds from the current one; the replies."""
        replies = []
        after: int | None = None
        for _ in range(rounds):
            current, reply = self.train_round(train, after, timeout)
            replies.append(reply)
            after = current.number if current.number is not None else current.version
        return replies


# -- FedProx ---------------------------------------------------------------------------------


def proximal_term(
    params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray], mu: float
) -> float:
    """FedProx's ``mu/2 * ||w - w_global||^2`` over all tensors (Li et al., 2020)."""
    total = math.fsum(
        float(np.sum(np.square(np.asarray(params[k], np.float64) - global_params[k])))
        for k in global_params
    )
    return 0.5 * mu * total


def proximal_gradient(
    params: Mapping[str, np.ndarray], global_params: Mapping[str, np.ndarray], mu: float
) -> dict[str, np.ndarray]:
    """The gradient of :func:`proximal_term`: ``mu * (w - w_global)``, per tensor, in the
    params' dtype (add it to the loss's gradient before the local step)."""
    out = {}
    for k, w in params.items():
        w = np.asarray(w)
        out[k] = (mu * (w - np.asarray(global_params[k], dtype=w.dtype))).astype(w.dtype)
    return out
