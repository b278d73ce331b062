"""The state of federated aggregation: the open round, its running sum, the history.

A client's update is its delta from the parameters it trained from: sent directly
(``form="delta"``) or as its new parameters (``form="params"``, the delta then being
``new - current``). A round keeps the running weighted sum ``sum_i w_i * delta_i`` in
float64 (whatever the session's dtype, so that the order in which clients arrive barely
matters) and the total weight; when it closes, its pseudo-gradient is

    g = -(sum_i w_i * delta_i) / (sum_i w_i)  =  current - weighted_average(client params)

which is the gradient the session's optimizer then takes one step on (Flower's
``current - aggregated``). Only one delta-sized buffer per tensor is kept, however many
clients a round has.

A round whose aggregator is not the mean, or whose session clips updates for privacy,
also keeps every client's delta (:attr:`OpenRound.updates`): the median of n updates
cannot be had from their sum. :func:`closing` turns a round's updates into its
pseudo-gradient through clipping, the aggregator and the privacy noise, in that order.

Everything here is plain data plus pure functions; the sessions layer decides when to
accept, close and log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import reductions
from service.core.errors import InvalidInput
from service.core.federated import aggregators, privacy
from service.core.federated.privacy import PrivacyState
from service.core.federated.spec import HISTORY_LIMIT, AggregationSpec

FORMS = ("params", "delta")
ACCUMULATOR = np.dtype(np.float64)
TOTAL_PREFIX = "round/total."
UPDATE_PREFIX = "round/update."


@dataclass
class Contribution:
    """One accepted client update of the open round (its delta is in the running sum)."""

    client_id: str
    num_examples: int
    weight: float
    norm: float
    """L2 norm of the client's delta over all tensors."""
    fingerprint: str
    """What identifies the update's content, for idempotent retries."""
    at: float
    key: str | None = None
    """The ``Idempotency-Key`` the update came with."""

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "client_id": self.client_id,
            "num_examples": self.num_examples,
            "weight": self.weight,
            "update_norm": self.norm,
            "fingerprint": self.fingerprint,
            "at": self.at,
        }
        if self.key is not None:
            out["idempotency_key"] = self.key
        return out


@dataclass
class OpenRound:
    number: int
    """1 for a session's first round."""
    version: int
    """The session's step when the round opened: the params clients train from."""
    opened_at: float
    total: list[np.ndarray]
    """sum_i w_i * delta_i per tensor, float64."""
    weight: float = 0.0
    contributions: list[Contribution] = field(default_factory=list)
    updates: list[list[np.ndarray]] | None = None
    """Every contribution's (unweighted) delta, float64, when the session needs them."""

    def find(self, client_id: str) -> Contribution | None:
        for contribution in self.contributions:
            if contribution.client_id == client_id:
                return contribution
        return None

    def deadline(self, spec: AggregationSpec) -> float | None:
        if spec.round_timeout_s is None:
            return None
        return self.opened_at + spec.round_timeout_s

    def closes_by(self, spec: AggregationSpec, now: float, received: int) -> str | None:
        """Why a round holding ``received`` updates closes at ``now``: "count",
        "timeout", or None while it stays open."""
        if received >= spec.clients_per_round:
            return "count"
        deadline = self.deadline(spec)
        if deadline is not None and now >= deadline and received >= spec.min_clients:
            return "timeout"
        return None


@dataclass
class Federation:
    """A federated session's aggregation state next to its optimizer state."""

    spec: AggregationSpec
    round: OpenRound | None
    """The open round (rounds mode); None in async mode."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Closed rounds (rounds mode) or applied updates (async mode), oldest first, at most
    ``HISTORY_LIMIT``."""
    privacy: PrivacyState | None = None
    """The clipping norm and noise generator, with ``spec.privacy``."""
    _keys: dict[str, KeyedUpdate] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    """The history's updates by idempotency key, built at the first look-up: every keyed
    update looks its key up, and the history holds up to HISTORY_LIMIT rounds of
    clients_per_round participants each."""

    def remember(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._keys is not None:
            self._keys.update(_keyed_updates(record))
        if len(self.history) > HISTORY_LIMIT:
            forgotten = self.history[: len(self.history) - HISTORY_LIMIT]
            del self.history[: len(forgotten)]
            keys = self._keys
            if keys is not None:
                for old in forgotten:
                    for key in _keyed_updates(old):
                        keys.pop(key, None)

    def keyed(self, key: str) -> KeyedUpdate | None:
        """The update of the history that came with idempotency key ``key``, if any."""
        if self._keys is None:
            self._keys = {}
            for record in self.history:
                self._keys.update(_keyed_updates(record))
        return self._keys.get(key)


@dataclass(frozen=True)
class KeyedUpdate:
    """Who sent an update with an idempotency key, where (round, or async base version),
    and its fingerprint: what a retry with that key must match."""

    client_id: str
    at: Any
    fingerprint: str


def _keyed_updates(record: Mapping[str, Any]) -> dict[str, KeyedUpdate]:
    """A history record's keyed updates (a round's participants, or one async update)."""
    at = record.get("round", record.get("base_version"))
    return {
        p["idempotency_key"]: KeyedUpdate(p["client_id"], at, p["fingerprint"])
        for p in record.get("participants", [record])
        if p.get("idempotency_key") is not None
    }


def zeros_like(shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    return [np.zeros(shape, dtype=ACCUMULATOR) for shape in shapes]


def start(
    spec: AggregationSpec, shapes: Sequence[tuple[int, ...]], step: int, now: float
) -> Federation:
    """A fresh federation; in rounds mode its first round opens at ``now``."""
    opened = None
    if spec.rounds:
        opened = OpenRound(1, step, now, zeros_like(shapes))
        opened.updates = [] if spec.keeps_updates else None
    dp = None if spec.privacy is None else privacy.start(spec.privacy)
    return Federation(spec, opened, privacy=dp)


def client_delta(
    form: str, values: Sequence[np.ndarray], current: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """A client's delta in float64: ``values`` as is, or ``values - current``."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    deltas = []
    for v, c in zip(values, current, strict=True):
        d = np.array(v, dtype=ACCUMULATOR, copy=True)
        if form == "params":
            d -= c
        deltas.append(d)
    return deltas


def norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm over all tensors (in a machine-independent order: replies are replayed)."""
    return reductions.total_norm(arrays)


def contribute(opened: OpenRound, contribution: Contribution, delta: Sequence[np.ndarray]) -> None:
    """Add a client's delta, weighted, to the round's sum. ``delta`` is scaled in place."""
    if opened.updates is not None:
        opened.updates.append([d.copy() for d in delta])
    for total, d in zip(opened.total, delta, strict=True):
        d *= contribution.weight
        total += d
    opened.weight += contribution.weight
    opened.contributions.append(contribution)


def pseudo_gradient(
    total: Sequence[np.ndarray], weight: float, dtype: np.dtype[Any]
) -> list[np.ndarray]:
    """``-(total / weight)`` in the session's dtype: the gradient the optimizer steps on."""
    if not weight > 0:
        raise ValueError(f"the total weight must be positive, got {weight}")
    return [np.divide(t, -weight).astype(dtype) for t in total]


def with_update(
    opened: OpenRound, weight: float, delta: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], float]:
    """The round's sum and weight as they would be with one more (unscaled) delta."""
    totals = [t + weight * d for t, d in zip(opened.total, delta, strict=True)]
    return totals, opened.weight + weight


@dataclass(frozen=True)
class Closing:
    """What closing a round gives: the step to take and what the history records of it."""

    gradient: list[np.ndarray]
    record: dict[str, Any]
    """Aggregator and privacy facts of the round (merged into its history record)."""
    privacy: PrivacyState | None
    """The privacy state after the round (the federation's is untouched until applied)."""


def closing(
    federation: Federation,
    dtype: np.dtype[Any],
    extra: tuple[str, float, Sequence[np.ndarray]] | None = None,
) -> Closing:
    """The open round's pseudo-gradient, with ``extra`` = (client id, weight, unscaled
    delta) as one more update, not yet contributed. Changes nothing."""
    opened, spec = federation.round, federation.spec
    assert opened is not None
    if opened.updates is None:
        if extra is None:
            return Closing(pseudo_gradient(opened.total, opened.weight, dtype), {}, None)
        totals, weight = with_update(opened, extra[1], extra[2])
        return Closing(pseudo_gradient(totals, weight, dtype), {}, None)
    updates = list(opened.updates)
    weights = [c.weight for c in opened.contributions]
    ids = [c.client_id for c in opened.contributions]
    if extra is not None:
        ids.append(extra[0])
        weights.append(extra[1])
        updates.append([np.asarray(d, dtype=ACCUMULATOR) for d in extra[2]])
    record: dict[str, Any] = {}
    clipped = 0
    dp, after = spec.privacy, federation.privacy
    if dp is not None:
        assert after is not None
        updates, clipped = privacy.clip(updates, after.clipping_norm)
    aggregate, kept = aggregators.aggregate(spec.aggregator, updates, weights)
    if kept is not None:
        record["kept"] = [ids[i] for i in kept]
    if dp is not None:
        assert after is not None
        released = privacy.release(dp, after, aggregate, clipped, len(updates))
        aggregate, after = released.aggregate, released.state
        record["privacy"] = released.record
    return Closing(pseudo_gradient(aggregate, 1.0, dtype), record, after)


def next_round(opened: OpenRound, version: int, now: float) -> OpenRound:
    """The round after ``opened``, its sums reset (the buffers are reused)."""
    for total in opened.total:
        total.fill(0.0)
    fresh = OpenRound(opened.number + 1, version, now, opened.total)
    fresh.updates = None if opened.updates is None else []
    return fresh


# -- flat form (checkpoints and snapshots) -------------------------------------------------


def to_flat(federation: Federation) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (the open round's sums and kept updates) and JSON (everything else)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"history": [dict(r) for r in federation.history], "round": None}
    if federation.privacy is not None:
        meta["privacy"] = federation.privacy.record()
    opened = federation.round
    if opened is not None:
        for i, total in enumerate(opened.total):
            arrays[f"{TOTAL_PREFIX}{i}"] = total
        for j, update in enumerate(opened.updates or ()):
            for i, delta in enumerate(update):
                arrays[f"{UPDATE_PREFIX}{j}.{i}"] = delta
        meta["round"] = {
            "number": opened.number,
            "version": opened.version,
            "opened_at": opened.opened_at,
            "weight": opened.weight,
            "contributions": [c.record() for c in opened.contributions],
        }
    return arrays, meta


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"federated state: {what} must be a finite number", "federated")
    return float(value)


def _integer(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"federated state: {what} must be an integer >= {minimum}", "federated")
    return value


def _contribution(raw: Any) -> Contribution:
    if not isinstance(raw, Mapping):
        raise InvalidInput("federated state: a contribution must be an object", "federated")
    client, fingerprint = raw.get("client_id"), raw.get("fingerprint")
    key = raw.get("idempotency_key")
    if not isinstance(client, str) or not isinstance(fingerprint, str):
        raise InvalidInput("federated state: contribution ids must be strings", "federated")
    if key is not None and not isinstance(key, str):
        raise InvalidInput("federated state: an idempotency key must be a string", "federated")
    return Contribution(
        client_id=client,
        num_examples=_integer(raw.get("num_examples"), "num_examples"),
        weight=_number(raw.get("weight"), "weight"),
        norm=_number(raw.get("update_norm"), "update_norm"),
        fingerprint=fingerprint,
        at=_number(raw.get("at"), "at"),
        key=key,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_record(spec: AggregationSpec, record: Any) -> bool:
    """Whether a history record has what duplicate detection and paging read."""
    if not isinstance(record, dict):
        return False
    if spec.rounds:
        participants = record.get("participants")
        return (
            _is_int(record.get("round"))
            and isinstance(participants, list)
            and all(
                isinstance(p, dict)
                and isinstance(p.get("client_id"), str)
                and isinstance(p.get("fingerprint"), str)
                for p in participants
            )
        )
    return (
        _is_int(record.get("version"))
        and _is_int(record.get("base_version"))
        and _is_int(record.get("staleness"))
        and isinstance(record.get("client_id"), str)
        and isinstance(record.get("fingerprint"), str)
        and isinstance(record.get("weight"), int | float)
        and not isinstance(record.get("weight"), bool)
    )


def from_flat(
    spec: AggregationSpec,
    shapes: Sequence[tuple[int, ...]],
    arrays: Mapping[str, np.ndarray],
    meta: Any,
) -> Federation:
    """Rebuild :func:`to_flat`'s output, checking all of it (a checkpoint may be forged).

    Raises :class:`InvalidInput` and nothing else. Arrays are copied.
    """
    if not isinstance(meta, Mapping) or not isinstance(meta.get("history"), list):
        raise InvalidInput("federated state must be an object with a history list", "federated")
    history = meta["history"]
    if len(history) > HISTORY_LIMIT or not all(_valid_record(spec, r) for r in history):
        raise InvalidInput("federated state: malformed history", "federated")
    raw = meta.get("round")
    expected = {f"{TOTAL_PREFIX}{i}" for i in range(len(shapes))} if raw is not None else set()
    kept = 0
    if raw is not None and spec.keeps_updates:
        contributions = raw.get("contributions") if isinstance(raw, Mapping) else None
        kept = len(contributions) if isinstance(contributions, list) else 0
        expected |= {f"{UPDATE_PREFIX}{j}.{i}" for j in range(kept) for i in range(len(shapes))}
    if set(arrays) != expected:
        raise InvalidInput("federated state: arrays do not match the round", "federated")
    if (raw is None) == spec.rounds:
        raise InvalidInput(
            f"federated state does not fit aggregation mode {spec.mode!r}", "federated"
        )
    opened = None
    if raw is not None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("contributions"), list):
            raise InvalidInput("federated state: malformed round", "federated")
        totals = [_array(arrays, f"{TOTAL_PREFIX}{i}", s) for i, s in enumerate(shapes)]
        updates = None
        if spec.keeps_updates:
            updates = [
                [_array(arrays, f"{UPDATE_PREFIX}{j}.{i}", s) for i, s in enumerate(shapes)]
                for j in range(kept)
            ]
        contributions = [_contribution(c) for c in raw["contributions"]]
        if len(contributions) >= spec.clients_per_round:
            raise InvalidInput("federated state: the round should have closed", "federated")
        if len({c.client_id for c in contributions}) != len(contributions):
            raise InvalidInput("federated state: a client contributed twice", "federated")
        opened = OpenRound(
            number=_integer(raw.get("number"), "round number", 1),
            version=_integer(raw.get("version"), "round version"),
            opened_at=_number(raw.get("opened_at"), "opened_at"),
            total=totals,
            weight=_number(raw.get("weight"), "round weight"),
            contributions=contributions,
            updates=updates,
        )
    dp = None
    if spec.privacy is not None:
        dp = privacy.from_record(meta.get("privacy"))
    elif meta.get("privacy") is not None:
        raise InvalidInput("federated state: privacy state in a session without it", "federated")
    return Federation(spec, opened, [dict(r) for r in history], dp)


def _array(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = arrays[name]
    if a.dtype != ACCUMULATOR or a.shape != tuple(shape):
        raise InvalidInput(f"federated state: {name} has the wrong shape", "federated")
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        raise InvalidInput(f"federated state: {name} is not finite", "federated")
    return np.array(a, dtype=ACCUMULATOR, copy=True)
