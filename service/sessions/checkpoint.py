"""Checkpoints: a whole session as named arrays plus string metadata (safetensors-ready).

``GET .../state`` exports one and ``POST /v1/sessions`` with one restores it as a new
session; the disk store's snapshots are the same thing. Layout:

- arrays: ``state/group<i>/<field>[.<k>]`` (core's ``state_to_flat``), when the
  session holds its parameters ``params/<name>``, and for a federated session the open
  round's sums as ``federated/round/total.<i>``;
- metadata: ``format`` (:data:`FORMAT`), ``session`` (the config as created, JSON),
  ``state`` (the JSON part of the training state), ``labels`` (JSON), ``step`` and
  ``holds_params`` (for humans and quick checks; ``state`` is authoritative), and for a
  federated session ``federated`` (the round and its history, JSON), and once a group
  was edited or added ``changes`` (the change log, JSON), and once a step was made
  ``steps`` (the step history, JSON, bounded by ``OPTSERVE_STEP_HISTORY``). The running sum
  of an accumulation is in the state, as ``state/accumulated/<tensor index>`` arrays.
  ``session`` is the config as it is now: groups added since the creation are in it.

Arrays are stored in the session's dtype and come back bit for bit, so a restored
session continues exactly where the exported one was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.codec import strict_json
from service.core.averaging import Average
from service.core.errors import CoreError
from service.core.federated.rounds import Federation
from service.core.plan import Plan, plan_from_config
from service.core.training import TrainState, state_from_flat, state_to_flat
from service.sessions.errors import InvalidCheckpoint, ParamsRequired
from service.sessions.federated import state as federated
from service.sessions.models import Change, StepRecord

FORMAT = "optserve.checkpoint/1"
PARAMS_PREFIX = "params/"
AVERAGE_PREFIX = "average/"
"""The averaged copy of the held params (``averaging``), by tensor name."""
STATE_PREFIX = "state/"


def is_checkpoint(metadata: Mapping[str, str]) -> bool:
    """Whether safetensors metadata marks a checkpoint (rather than initial params)."""
    return metadata.get("format") == FORMAT


def export(
    plan: Plan,
    config: Mapping[str, Any],
    labels: Mapping[str, str],
    state: TrainState,
    held: list[np.ndarray] | None,
    federation: Federation | None = None,
    changes: Sequence[Change] = (),
    history: Sequence[StepRecord] = (),
    average: Average | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The checkpoint of a session. Arrays are the live ones: copy them to keep them."""
    arrays, meta = state_to_flat(plan, state)
    arrays = dict(arrays)
    if held is not None:
        for spec, values in zip(plan.tensors, held, strict=True):
            arrays[PARAMS_PREFIX + spec.name] = values
    metadata = {
        "format": FORMAT,
        # Strict JSON: a non-finite float (an lr of inf, LBFGS's overflowed scalars) is
        # written "inf", "-inf" or "nan"; the config reads those back as floats, and so
        # does restore() for the state.
        "session": strict_json.dumps(dict(config)),
        "state": strict_json.dumps(meta),
        "labels": strict_json.dumps(dict(labels)),
        "step": str(state.step),
        "holds_params": "true" if held is not None else "false",
    }
    if changes:
        metadata["changes"] = json.dumps([c.to_json() for c in changes], separators=(",", ":"))
    if average is not None:
        for spec, values in zip(plan.tensors, average.values, strict=True):
            arrays[AVERAGE_PREFIX + spec.name] = values
        metadata["average"] = json.dumps({"n_averaged": average.n_averaged})
    if history:
        metadata["steps"] = "[" + ",".join(r.json_text for r in history) + "]"
    if federation is not None:
        federated_arrays, federated_metadata = federated.export(federation)
        arrays.update(federated_arrays)
        metadata.update(federated_metadata)
    return arrays, metadata


@dataclass
class Restored:
    config: dict[str, Any]
    labels: dict[str, str]
    plan: Plan
    state: TrainState
    held: list[np.ndarray] | None
    federation: Federation | None = None
    changes: list[Change] = field(default_factory=list)
    history: list[StepRecord] = field(default_factory=list)
    average: Average | None = None


def _json(metadata: Mapping[str, str], key: str) -> Any:
    if key not in metadata:
        raise InvalidCheckpoint(f"checkpoint metadata lacks {key!r}")
    try:
        return json.loads(metadata[key])
    except (TypeError, ValueError) as exc:
        raise InvalidCheckpoint(f"checkpoint metadata {key!r} is not valid JSON") from exc


def restore(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str], plan: Plan | None = None
) -> Restored:
    """Rebuild a session's parts from :func:`export`'s output, checking everything.

    Raises :class:`InvalidCheckpoint` (or core's errors for a bad config inside it);
    never anything else, whatever the input. Arrays are copied.
    """
    if not is_checkpoint(metadata):
        raise InvalidCheckpoint(f"not an optserve checkpoint (metadata format != {FORMAT!r})")
    config = _json(metadata, "session")
    meta = _json(metadata, "state")
    labels = _json(metadata, "labels")
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise InvalidCheckpoint("checkpoint 'session' and 'state' must be JSON objects")
    # Hyperparameters and optimizer scalars hold no strings that could mean anything but
    # the floats export() wrote as strings; schedule states keep their own encoding.
    for key in ("groups", "optimizer_state"):
        if key in meta:
            meta[key] = strict_json.nonfinite_floats(meta[key])
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidCheckpoint("checkpoint 'labels' must map strings to strings")
    if plan is None:
        plan = plan_from_config(config, ignore=federated.OUTER_KEYS)
    holds = metadata.get("holds_params") == "true"
    state_arrays: dict[str, np.ndarray] = {}
    held_arrays: dict[str, np.ndarray] = {}
    federated_arrays: dict[str, np.ndarray] = {}
    average_arrays: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith(AVERAGE_PREFIX) and holds:
            average_arrays[name[len(AVERAGE_PREFIX) :]] = array
        elif name.startswith(STATE_PREFIX):
            state_arrays[name] = array
        elif name.startswith(PARAMS_PREFIX) and holds:
            held_arrays[name[len(PARAMS_PREFIX) :]] = array
        elif name.startswith(federated.ARRAY_PREFIX):
            federated_arrays[name[len(federated.ARRAY_PREFIX) :]] = array
        else:
            raise InvalidCheckpoint(
                f"unexpected array {name!r} in checkpoint",
            )
    try:
        state = state_from_flat(plan, state_arrays, meta)
    except CoreError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise InvalidCheckpoint(f"checkpoint state does not fit its config: {exc}") from exc
    held = _held(plan, held_arrays) if holds else None
    try:
        federation = federated.restore(config, plan, holds, federated_arrays, metadata)
    except ParamsRequired as exc:
        raise InvalidCheckpoint(str(exc)) from exc
    average = _average(plan, average_arrays, metadata) if held is not None else None
    return Restored(
        config,
        labels,
        plan,
        state,
        held,
        federation,
        _changes(metadata),
        _history(metadata),
        average,
    )


def _changes(metadata: Mapping[str, str]) -> list[Change]:
    if "changes" not in metadata:
        return []
    raw = _json(metadata, "changes")
    try:
        return [Change.from_json(entry) for entry in raw]
    except (TypeError, ValueError) as exc:
        raise InvalidCheckpoint(f"checkpoint 'changes' is malformed: {exc}") from exc


def _average(
    plan: Plan, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> Average | None:
    if plan.averaging is None:
        if arrays:
            raise InvalidCheckpoint("checkpoint has an average but its config no averaging")
        return None
    if "average" not in metadata:
        raise InvalidCheckpoint("checkpoint with averaging lacks its 'average'")
    meta = _json(metadata, "average")
    n = meta.get("n_averaged") if isinstance(meta, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidCheckpoint("checkpoint 'average' must give n_averaged, an integer >= 0")
    return Average(_held(plan, arrays), n)


def _history(metadata: Mapping[str, str]) -> list[StepRecord]:
    if "steps" not in metadata:
        return []
    raw = _json(metadata, "steps")
    try:
        return [StepRecord.from_json(entry) for entry in raw]
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidCheckpoint(f"checkpoint 'steps' is malformed: {exc}") from exc


def _held(plan: Plan, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    names = {spec.name for spec in plan.tensors}
    for name in arrays:
        if name not in names:
            raise InvalidCheckpoint(f"checkpoint params {name!r} is not a tensor of the session")
    held = []
    for spec in plan.tensors:
        values = arrays.get(spec.name)
        if values is None:
            raise InvalidCheckpoint(f"checkpoint lacks params {spec.name!r}")
        if values.shape != spec.shape or values.dtype != plan.dtype:
            raise InvalidCheckpoint(
                f"checkpoint params {spec.name!r} is {values.dtype}{list(values.shape)}, "
                f"expected {plan.dtype}{list(spec.shape)}"
            )
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise InvalidCheckpoint(f"checkpoint params {spec.name!r} holds NaN or Inf")
        held.append(np.array(values, copy=True, order="C"))
    return held
