"""A federated session's aggregation state at creation and in checkpoints.

Kept apart from :mod:`.session` because checkpoints (which :mod:`service.sessions.live`
imports) need it: this module depends on core and the sessions errors only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.federated import rounds
from service.core.federated.rounds import Federation
from service.core.federated.spec import FIELD, parse_aggregation
from service.core.plan import Plan
from service.sessions.errors import ParamsRequired

OUTER_KEYS = (FIELD,)
"""Session config keys that the sessions layer owns (``plan_from_config(ignore=...)``)."""
ARRAY_PREFIX = "federated/"
METADATA_KEY = "federated"


def begin(raw: Any, plan: Plan, holds_params: bool, now: float) -> Federation | None:
    """The federation of a new session (its first round open at ``now``), or None without
    ``aggregation``. Checks the option against the rest of the config."""
    spec = parse_aggregation(raw)
    if spec is None:
        return None
    check_plan(plan, holds_params)
    return rounds.start(spec, [t.shape for t in plan.tensors], 0, now)


def check_plan(plan: Plan, holds_params: bool) -> None:
    if not holds_params:
        raise ParamsRequired(
            "a session with 'aggregation' is the clients' parameter server: give every "
            "tensor initial 'data' so that it holds the global parameters"
        )
    if plan.ask_tell:
        raise InvalidHyperparameter(
            FIELD,
            "LBFGS with a line search or max_iter > 1 asks for points to evaluate; it cannot "
            "take aggregated client updates",
        )
    schedule = plan.schedule
    if schedule is not None and schedule.interval == "step" and schedule.schedule.needs_metric:
        raise InvalidHyperparameter(
            "schedule.interval",
            f"{schedule.schedule.name} needs a metric: with 'aggregation' give it "
            '"interval": "manual" and step it with POST .../schedule/step',
        )


def export(federation: Federation) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Checkpoint arrays (live: copy to keep) and metadata of a federation."""
    arrays, meta = rounds.to_flat(federation)
    named = {ARRAY_PREFIX + name: array for name, array in arrays.items()}
    return named, {METADATA_KEY: json.dumps(meta, separators=(",", ":"), allow_nan=False)}


def restore(
    config: Mapping[str, Any],
    plan: Plan,
    holds_params: bool,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
) -> Federation | None:
    """The federation a checkpoint holds, checked; :class:`InvalidInput` if it does not fit.

    ``arrays`` are the checkpoint's ``federated/`` arrays, prefix removed.
    """
    spec = parse_aggregation(config.get(FIELD))
    raw = metadata.get(METADATA_KEY)
    if spec is None:
        if raw is not None or arrays:
            raise InvalidInput("federated state in a session without aggregation", "federated")
        return None
    if raw is None:
        raise InvalidInput("the checkpoint lacks its federated state", "federated")
    check_plan(plan, holds_params)
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("the checkpoint's federated state is not JSON", "federated") from exc
    return rounds.from_flat(spec, [t.shape for t in plan.tensors], arrays, meta)
