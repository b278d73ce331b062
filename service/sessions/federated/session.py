"""One federated session's logic: check an update, apply it, close rounds, replay the log.

Like :mod:`service.sessions.live` this is synchronous and runs on worker threads under
the session's lock. Everything that can refuse an update (late round, duplicate with
another body, staleness, shapes, NaN, a pseudo-gradient that would overflow) happens in
:func:`prepare_update` / :func:`prepare_close`, before the event is logged; applying a
prepared change cannot fail. Replaying a logged event runs the same two functions with
the event's own time and closing decision, which is what makes recovery reproduce the
acknowledged round state bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import InvalidInput
from service.core.federated import rounds
from service.core.federated.rounds import Closing, Contribution, Federation, KeyedUpdate
from service.core.federated.spec import AggregationSpec
from service.core.federated.staleness import staleness_weight
from service.core.training import apply_step, check_step, first_nonfinite
from service.sessions.errors import IdempotencyKeyReused
from service.sessions.federated.errors import (
    RoundClosed,
    RoundNotOpen,
    UpdateConflict,
    UpdateTooStale,
)
from service.sessions.federated.models import RoundParams, UpdateReply, UpdateRequest
from service.sessions.live import LiveSession, all_tensors
from service.sessions.models import timestamp
from service.sessions.store.base import Event

MAX_NUM_EXAMPLES = 2**53
"""Weights stay exact in float64."""
FEDERATED_EVENTS = ("update", "close")


# -- updates ---------------------------------------------------------------------------------


@dataclass
class PreparedUpdate:
    """A checked update: either a duplicate to answer, or what applying it takes."""

    request: UpdateRequest
    fingerprint: str
    duplicate: UpdateReply | None = None
    tensors: dict[str, np.ndarray] | None = None
    """As received, cast to the session's dtype: what the log keeps."""
    delta: list[np.ndarray] | None = None
    weight: float = 0.0
    norm: float = 0.0
    staleness: int | None = None
    closes: str | None = None
    """Rounds mode: "count" or "timeout" when this update closes its round."""
    gradient: list[np.ndarray] | None = None
    """The pseudo-gradient, when this update makes an optimizer step."""
    closing: Closing | None = None
    """Rounds mode: the round's close, when this update closes it."""


def _federation(live: LiveSession) -> Federation:
    federation: Federation | None = getattr(live, "federation", None)
    assert federation is not None, "not a federated session"
    return federation


def _held(live: LiveSession) -> list[np.ndarray]:
    assert live.held is not None, "a federated session holds its params"
    return live.held


def fingerprint(request: UpdateRequest, ordered: Sequence[np.ndarray]) -> str:
    """What identifies an update: its position, form, weight and exact values."""
    digest = hashlib.sha256()
    head = (
        f"{request.client_id}\n{request.round}\n{request.base_version}\n"
        f"{request.form}\n{request.num_examples}\n"
    )
    digest.update(head.encode())
    for values in ordered:
        digest.update(str(values.shape).encode())
        digest.update(np.ascontiguousarray(values).view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


def _parse(
    live: LiveSession, request: UpdateRequest
) -> tuple[dict[str, np.ndarray], list[np.ndarray], str]:
    by_name = all_tensors(live.plan, request.tensors, request.form)
    ordered = [by_name[spec.name] for spec in live.plan.tensors]
    bad = first_nonfinite(live.plan, ordered)
    if bad is not None:
        raise InvalidInput(f"{request.form} {bad!r} holds NaN or Inf", f"{request.form}.{bad}")
    return by_name, ordered, fingerprint(request, ordered)


def _weight(spec: AggregationSpec, request: UpdateRequest) -> float:
    n = request.num_examples
    if spec.rounds and spec.weighting == "num_examples" and n is None:
        raise InvalidInput(
            "this session weights updates by num_examples: send 'num_examples'", "num_examples"
        )
    if n is not None and not 0 < n <= MAX_NUM_EXAMPLES:
        raise InvalidInput(
            f"num_examples must be from 1 to {MAX_NUM_EXAMPLES}, got {n}", "num_examples"
        )
    if spec.rounds and spec.weighting == "num_examples":
        assert n is not None
        return float(n)
    return 1.0


def _checked_closing(live: LiveSession, closing: Closing) -> Closing:
    _checked_gradient(live, closing.gradient)
    return closing


def _checked_gradient(live: LiveSession, gradient: list[np.ndarray]) -> list[np.ndarray]:
    """Refuse, before anything is logged, a pseudo-gradient the step would refuse: the
    same check :func:`apply_step` makes (a SOAP tensor's first statistics overflowing
    included), so that nothing logged is refused when it is applied or replayed."""
    plan = live.plan
    params = _held(live) if plan.needs_params else None
    try:
        check_step(plan, live.state, gradient, params)
    except InvalidInput as exc:
        raise InvalidInput(f"the aggregated update cannot be applied: {exc}", exc.field) from exc
    return gradient


def prepare_update(
    live: LiveSession, request: UpdateRequest, now: float, closes: str | None = None
) -> PreparedUpdate:
    """Check ``request`` against the session at time ``now``; change nothing.

    ``closes`` is given on replay (the logged decision); live, it is decided here.
    """
    federation = _federation(live)
    if request.form not in rounds.FORMS:
        raise InvalidInput(f"an update sends 'params' or 'delta', not {request.form!r}", "form")
    if request.idempotency_key is not None:
        _check_key(live, federation, request)
    if federation.spec.rounds:
        return _prepare_round_update(live, federation, request, now, closes)
    return _prepare_async_update(live, federation, request)


def _keyed(federation: Federation, key: str) -> KeyedUpdate | None:
    """The update accepted with idempotency key ``key``, if the session still knows it."""
    opened = federation.round
    if opened is not None:
        for c in opened.contributions:
            if c.key == key:
                return KeyedUpdate(c.client_id, opened.number, c.fingerprint)
    return federation.keyed(key)


def _check_key(live: LiveSession, federation: Federation, request: UpdateRequest) -> None:
    """Refuse an idempotency key that came with another update (as steps do: 422). The
    retry of the keyed update itself is then answered as the duplicate it is."""
    assert request.idempotency_key is not None
    earlier = _keyed(federation, request.idempotency_key)
    if earlier is None:
        return
    at = request.round if federation.spec.rounds else request.base_version
    same_place = (earlier.client_id, earlier.at) == (request.client_id, at)
    if not same_place or earlier.fingerprint != _parse(live, request)[2]:
        raise IdempotencyKeyReused(request.idempotency_key)


def _prepare_round_update(
    live: LiveSession,
    federation: Federation,
    request: UpdateRequest,
    now: float,
    closes: str | None,
) -> PreparedUpdate:
    spec, opened = federation.spec, federation.round
    assert opened is not None
    if request.base_version is not None:
        raise InvalidInput(
            "this session aggregates in rounds: send 'round', not 'base_version'", "base_version"
        )
    number = request.round
    if number is None:
        raise InvalidInput("an update for a round-based session needs 'round'", "round")
    if number < 1:
        raise InvalidInput(f"rounds are numbered from 1, got {number}", "round")
    if number > opened.number:
        raise RoundNotOpen(number, opened.number)
    if number < opened.number:
        return _late(live, federation, request, number)
    weight = _weight(spec, request)
    by_name, ordered, fp = _parse(live, request)
    earlier = opened.find(request.client_id)
    if earlier is not None:
        if earlier.fingerprint != fp:
            raise UpdateConflict(request.client_id, f"round {number}")
        position = opened.contributions.index(earlier) + 1
        return PreparedUpdate(request, fp, duplicate=_round_reply(live, request, position, False))
    delta = rounds.client_delta(request.form, ordered, _held(live))
    prepared = PreparedUpdate(
        request, fp, tensors=by_name, delta=delta, weight=weight, norm=rounds.norm(delta)
    )
    received = len(opened.contributions) + 1
    prepared.closes = closes if closes is not None else opened.closes_by(spec, now, received)
    if prepared.closes is not None:
        closing = rounds.closing(federation, live.plan.dtype, (request.client_id, weight, delta))
        prepared.closing = _checked_closing(live, closing)
    return prepared


def _late(
    live: LiveSession, federation: Federation, request: UpdateRequest, number: int
) -> PreparedUpdate:
    """An update for a closed round: a retry of an accepted one is answered again."""
    assert federation.round is not None
    for record in reversed(federation.history):
        if record.get("round") != number:
            continue
        for position, participant in enumerate(record["participants"], start=1):
            if participant["client_id"] == request.client_id:
                _, _, fp = _parse(live, request)
                if participant["fingerprint"] != fp:
                    raise UpdateConflict(request.client_id, f"round {number}")
                return PreparedUpdate(
                    request, fp, duplicate=_round_reply(live, request, position, True)
                )
        break
    raise RoundClosed(number, federation.round.number)


def _round_reply(
    live: LiveSession, request: UpdateRequest, position: int, closed: bool
) -> UpdateReply:
    return UpdateReply(
        mode="rounds",
        client_id=request.client_id,
        version=live.state.step,
        duplicate=True,
        round=request.round,
        received=position,
        round_closed=closed,
    )


def _prepare_async_update(
    live: LiveSession, federation: Federation, request: UpdateRequest
) -> PreparedUpdate:
    spec, version = federation.spec, live.state.step
    if request.round is not None:
        raise InvalidInput(
            "this session applies updates asynchronously: send 'base_version', not 'round'",
            "round",
        )
    base = request.base_version
    if base is None:
        raise InvalidInput(
            "an asynchronous update needs 'base_version': the version it trained from",
            "base_version",
        )
    if base > version:
        raise InvalidInput(
            f"base_version {base} is ahead of the session's version {version}", "base_version"
        )
    _weight(spec, request)
    for record in reversed(federation.history):
        if record.get("client_id") == request.client_id and record.get("base_version") == base:
            _, _, fp = _parse(live, request)
            if record["fingerprint"] != fp:
                raise UpdateConflict(request.client_id, f"base version {base}")
            return PreparedUpdate(
                request,
                fp,
                duplicate=UpdateReply(
                    mode="async",
                    client_id=request.client_id,
                    version=int(record["version"]),
                    duplicate=True,
                    base_version=base,
                    staleness=int(record["staleness"]),
                    weight=float(record["weight"]),
                ),
            )
    staleness = version - base
    if staleness > spec.max_staleness:
        raise UpdateTooStale(base, version, spec.max_staleness)
    by_name, ordered, fp = _parse(live, request)
    delta = rounds.client_delta(request.form, ordered, _held(live))
    weight = staleness_weight(spec, staleness)
    gradient = [np.multiply(d, -weight).astype(live.plan.dtype) for d in delta]
    return PreparedUpdate(
        request,
        fp,
        tensors=by_name,
        delta=delta,
        weight=weight,
        norm=rounds.norm(delta),
        staleness=staleness,
        gradient=_checked_gradient(live, gradient),
    )


def apply_update(live: LiveSession, prepared: PreparedUpdate, at: float) -> UpdateReply:
    """Apply a prepared, new update (the event is being logged meanwhile)."""
    federation = _federation(live)
    request = prepared.request
    assert prepared.delta is not None and prepared.duplicate is None
    if federation.spec.rounds:
        opened = federation.round
        assert opened is not None
        contribution = Contribution(
            client_id=request.client_id,
            num_examples=request.num_examples if request.num_examples is not None else 1,
            weight=prepared.weight,
            norm=prepared.norm,
            fingerprint=prepared.fingerprint,
            at=at,
            key=request.idempotency_key,
        )
        rounds.contribute(opened, contribution, prepared.delta)
        received = len(opened.contributions)
        if prepared.closes is not None:
            assert prepared.closing is not None
            _close(live, federation, prepared.closing, at, prepared.closes)
        return UpdateReply(
            mode="rounds",
            client_id=request.client_id,
            version=live.state.step,
            round=opened.number,
            received=received,
            round_closed=prepared.closes is not None,
        )
    assert prepared.gradient is not None and prepared.staleness is not None
    base = request.base_version
    gradient_norm = rounds.norm(prepared.gradient)
    applied = _step(live, prepared.gradient)
    keyed = {} if request.idempotency_key is None else {"idempotency_key": request.idempotency_key}
    federation.remember(
        {
            **keyed,
            "version": live.state.step,
            "client_id": request.client_id,
            "base_version": base,
            "staleness": prepared.staleness,
            "weight": prepared.weight,
            "num_examples": request.num_examples if request.num_examples is not None else 1,
            "update_norm": prepared.norm,
            "pseudo_gradient_norm": gradient_norm,
            "applied": applied,
            "at": at,
            "fingerprint": prepared.fingerprint,
        }
    )
    return UpdateReply(
        mode="async",
        client_id=request.client_id,
        version=live.state.step,
        base_version=base,
        staleness=prepared.staleness,
        weight=prepared.weight,
    )


def _step(live: LiveSession, gradient: list[np.ndarray]) -> bool:
    """One optimizer step on the pseudo-gradient, added to the held params."""
    plan = live.plan
    held = _held(live)
    out = [np.empty(spec.shape, dtype=plan.dtype) for spec in plan.tensors]
    outcome = apply_step(plan, live.state, gradient, held if plan.needs_params else None, out)
    if outcome.applied:
        for values, delta in zip(held, out, strict=True):
            values += delta
    return outcome.applied


def _close(
    live: LiveSession, federation: Federation, closing: Closing, at: float, why: str
) -> None:
    opened = federation.round
    assert opened is not None
    # Measured before the step: clipping scales the gradient in place.
    gradient_norm = rounds.norm(closing.gradient)
    applied = _step(live, closing.gradient)
    if closing.privacy is not None:
        federation.privacy = closing.privacy
    federation.remember(
        {
            "round": opened.number,
            "version": opened.version,
            "opened_at": opened.opened_at,
            "closed_at": at,
            "closed_by": why,
            "participants": [c.record() for c in opened.contributions],
            "total_weight": opened.weight,
            "pseudo_gradient_norm": gradient_norm,
            "applied": applied,
            "step": live.state.step,
            **closing.record,
        }
    )
    federation.round = rounds.next_round(opened, live.state.step, at)


def prepare_close(live: LiveSession, now: float, force: bool = False) -> Closing | None:
    """The round's close when the open round closes by timeout at ``now``, else None."""
    federation = _federation(live)
    opened = federation.round
    if opened is None or not opened.contributions:
        return None
    received = len(opened.contributions)
    if not force and opened.closes_by(federation.spec, now, received) != "timeout":
        return None
    return _checked_closing(live, rounds.closing(federation, live.plan.dtype))


def apply_close(live: LiveSession, closing: Closing, at: float) -> None:
    _close(live, _federation(live), closing, at, "timeout")


# -- the log ---------------------------------------------------------------------------------


def update_event(prepared: PreparedUpdate, seq: int, at: float) -> Event:
    request = prepared.request
    assert prepared.tensors is not None
    return Event(
        seq=seq,
        kind="update",
        at=at,
        fingerprint=prepared.fingerprint,
        grads=prepared.tensors,
        info={
            "client_id": request.client_id,
            "form": request.form,
            "num_examples": request.num_examples,
            "round": request.round,
            "base_version": request.base_version,
            "closes": prepared.closes,
            "idempotency_key": request.idempotency_key,
        },
    )


def close_event(live: LiveSession, seq: int, at: float) -> Event:
    opened = _federation(live).round
    assert opened is not None
    return Event(seq=seq, kind="close", at=at, info={"round": opened.number})


def replay(live: LiveSession, event: Event) -> None:
    """Re-apply a logged federated event exactly as it was applied."""
    info = event.info or {}
    if event.kind == "close":
        opened = _federation(live).round
        if opened is None or opened.number != info.get("round"):
            raise InvalidInput(f"logged close of round {info.get('round')} does not follow")
        closing = prepare_close(live, event.at, force=True)
        if closing is None:
            raise InvalidInput("logged close of an empty round")
        apply_close(live, closing, event.at)
        return
    request = UpdateRequest(
        client_id=str(info["client_id"]),
        form=str(info["form"]),
        tensors=dict(event.grads),
        num_examples=info.get("num_examples"),
        round=info.get("round"),
        base_version=info.get("base_version"),
        idempotency_key=info.get("idempotency_key"),
    )
    prepared = prepare_update(live, request, event.at, closes=info.get("closes"))
    if prepared.duplicate is not None:
        raise InvalidInput(f"logged update of client {request.client_id!r} was a duplicate")
    apply_update(live, prepared, event.at)


# -- views -----------------------------------------------------------------------------------


def position(live: LiveSession) -> int:
    """What a long poll waits past: the open round's number, or the version in async mode."""
    federation = _federation(live)
    if federation.round is not None:
        return federation.round.number
    return live.state.step


def params(live: LiveSession) -> RoundParams:
    federation = _federation(live)
    held = _held(live)
    tensors = {spec.name: v.copy() for spec, v in zip(live.plan.tensors, held, strict=True)}
    opened = federation.round
    return RoundParams(
        mode=federation.spec.mode,
        round=None if opened is None else opened.number,
        version=live.state.step,
        tensors=tensors,
    )


def _client_lr(live: LiveSession) -> float | None:
    value = live.state.groups[0].get("eta_l") if live.state.groups else None
    return float(value) if isinstance(value, int | float) else None


def round_document(live: LiveSession, now: float) -> dict[str, Any]:
    """``GET .../round``: where the session's aggregation stands."""
    federation = _federation(live)
    spec = federation.spec
    common = {
        "aggregation": spec.describe(),
        "version": live.state.step,
        "client_lr": _client_lr(live),
        "lr": [float(g["lr"]) for g in live.state.groups],
    }
    opened = federation.round
    if opened is None:
        return {
            "mode": "async",
            **common,
            "oldest_base_version": max(0, live.state.step - spec.max_staleness),
            "applied_updates": live.state.step,
        }
    deadline = opened.deadline(spec)
    received = len(opened.contributions)
    overdue = deadline is not None and now >= deadline
    return {
        "mode": "rounds",
        **common,
        "round": opened.number,
        "proximal_mu": spec.proximal_mu,
        "clipping_norm": None if federation.privacy is None else federation.privacy.clipping_norm,
        "status": "overdue" if overdue else "open",
        "opened_at": timestamp(opened.opened_at),
        "deadline": None if deadline is None else timestamp(deadline),
        "seconds_left": None if deadline is None else max(0.0, deadline - now),
        "received": received,
        "clients": [c.client_id for c in opened.contributions],
        "needed": spec.clients_per_round - received,
    }


def _public(record: Mapping[str, Any]) -> dict[str, Any]:
    """A history record without what only the server needs (fingerprints), times as text."""
    out = {k: v for k, v in record.items() if k not in ("fingerprint", "idempotency_key")}
    for key in ("at", "opened_at", "closed_at"):
        if isinstance(out.get(key), int | float):
            out[key] = timestamp(out[key])
    if "participants" in out:
        out["participants"] = [_public(p) for p in out["participants"]]
    return out


def history(
    live: LiveSession, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Closed rounds (or applied async updates) after ``after``, oldest first, and the
    cursor for the next page."""
    federation = _federation(live)
    key = "round" if federation.spec.rounds else "version"
    records = [r for r in federation.history if after is None or r[key] > after]
    page = records[:limit]
    cursor = page[-1][key] if len(records) > limit else None
    return [_public(r) for r in page], cursor
