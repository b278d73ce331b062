"""The session option ``aggregation``: how client updates become optimizer steps.

``{"mode": "rounds", "clients_per_round": K, "min_clients": M, "round_timeout_s": T,
"weighting": "num_examples" | "uniform"}``: a round closes when K updates are in, or once
T seconds have passed with at least M; its weighted average becomes one step.

Robust aggregation (``"aggregator"``, :mod:`.aggregators`), central differential privacy
(``"privacy"``, :mod:`.privacy`) and FedProx's ``"proximal_mu"`` (for clients: the server
only reports it) belong to rounds mode.

``{"mode": "async", "staleness": {"policy": "constant" | "polynomial", "alpha": a0,
"a": a, "max_staleness": S}}``: every update is one step, weighted by
``alpha * s(staleness)`` (FedAsync, Xie et al., 2019); updates more than S versions old
are refused.

:func:`parse_aggregation` validates the option and raises ``InvalidHyperparameter`` with
dotted field paths (``"aggregation.min_clients"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.core.errors import InvalidHyperparameter
from service.core.federated.aggregators import AggregatorSpec, parse_aggregator
from service.core.federated.privacy import PrivacySpec, parse_privacy
from service.core.hparams import Arg, check, resolve

FIELD = "aggregation"
MODES = ("rounds", "async")
HISTORY_LIMIT = 1000
"""Closed rounds (or applied async updates) a session remembers, newest last."""
MAX_CLIENTS_PER_ROUND = 10_000
MAX_TIMEOUT_S = 30 * 24 * 3600.0

ROUNDS_ARGS = (
    Arg("mode", "str", None, "'rounds' or 'async'", choices=MODES, required=True),
    Arg("clients_per_round", "int", None, "updates that close a round (K)", required=True),
    Arg("min_clients", "int", 1, "updates a round needs to close at its timeout (M)"),
    Arg(
        "round_timeout_s",
        "float",
        None,
        "seconds after opening when a round with M updates closes (null: only K closes)",
        nullable=True,
    ),
    Arg(
        "weighting",
        "str",
        "num_examples",
        "weight of a client's update in the average",
        choices=("num_examples", "uniform"),
    ),
    Arg("aggregator", "any", None, "robust aggregation rule (default: FedAvg)", nullable=True),
    Arg("privacy", "any", None, "central differential privacy", nullable=True),
    Arg("proximal_mu", "float", 0.0, "FedProx's mu, sent to clients in the round document"),
)
ASYNC_ARGS = (
    Arg("mode", "str", None, "'rounds' or 'async'", choices=MODES, required=True),
    Arg("staleness", "any", None, "staleness policy", nullable=True),
)
STALENESS_ARGS = (
    Arg(
        "policy",
        "str",
        "constant",
        "weight by staleness s: constant alpha, or polynomial alpha * (1 + s)^-a",
        choices=("constant", "polynomial"),
    ),
    Arg("alpha", "float", 1.0, "weight of a fresh update (FedAsync's mixing parameter)"),
    Arg("a", "float", 0.5, "exponent of the polynomial policy"),
    Arg("max_staleness", "int", 10, "updates more versions behind than this are refused"),
)


MEAN = AggregatorSpec()


@dataclass(frozen=True)
class AggregationSpec:
    mode: str
    clients_per_round: int = 1
    min_clients: int = 1
    round_timeout_s: float | None = None
    weighting: str = "num_examples"
    policy: str = "constant"
    alpha: float = 1.0
    a: float = 0.5
    max_staleness: int = 10
    aggregator: AggregatorSpec = MEAN
    privacy: PrivacySpec | None = None
    proximal_mu: float = 0.0

    @property
    def rounds(self) -> bool:
        return self.mode == "rounds"

    @property
    def keeps_updates(self) -> bool:
        """Whether a round keeps every client's delta (a robust aggregator or clipping
        needs them all) rather than only their running weighted sum."""
        return not self.aggregator.is_mean or self.privacy is not None

    def describe(self) -> dict[str, Any]:
        """The resolved option, in the form :func:`parse_aggregation` accepts."""
        if self.rounds:
            return {
                "mode": "rounds",
                "clients_per_round": self.clients_per_round,
                "min_clients": self.min_clients,
                "round_timeout_s": self.round_timeout_s,
                "weighting": self.weighting,
                "aggregator": self.aggregator.describe(),
                "privacy": None if self.privacy is None else self.privacy.describe(),
                "proximal_mu": self.proximal_mu,
            }
        return {
            "mode": "async",
            "staleness": {
                "policy": self.policy,
                "alpha": self.alpha,
                "a": self.a,
                "max_staleness": self.max_staleness,
            },
        }


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidHyperparameter(field, f"{field} must be an object, got {value!r}", value)
    return value


def _rounds(given: Mapping[str, Any]) -> AggregationSpec:
    where = f"{FIELD}."
    hp = resolve(ROUNDS_ARGS, given, where=where)
    k, m, timeout = hp["clients_per_round"], hp["min_clients"], hp["round_timeout_s"]
    check(
        1 <= k <= MAX_CLIENTS_PER_ROUND,
        f"{where}clients_per_round",
        f"clients_per_round must be from 1 to {MAX_CLIENTS_PER_ROUND}, got {k}",
        k,
    )
    check(
        1 <= m <= k,
        f"{where}min_clients",
        f"min_clients must be from 1 to clients_per_round ({k}), got {m}",
        m,
    )
    if timeout is not None:
        check(
            0.0 < timeout <= MAX_TIMEOUT_S,
            f"{where}round_timeout_s",
            f"round_timeout_s must be > 0 and at most {MAX_TIMEOUT_S:g}, got {timeout}",
            timeout,
        )
    mu = hp["proximal_mu"]
    check(
        0.0 <= mu < math.inf,
        f"{where}proximal_mu",
        f"proximal_mu must be finite and >= 0, got {mu}",
        mu,
    )
    return AggregationSpec(
        mode="rounds",
        clients_per_round=k,
        min_clients=m,
        round_timeout_s=timeout,
        weighting=hp["weighting"],
        aggregator=parse_aggregator(hp["aggregator"], m),
        privacy=parse_privacy(hp["privacy"], k),
        proximal_mu=mu,
    )


def _async(given: Mapping[str, Any]) -> AggregationSpec:
    where = f"{FIELD}.staleness."
    hp = resolve(ASYNC_ARGS, given, where=f"{FIELD}.")
    raw = hp["staleness"]
    staleness = resolve(
        STALENESS_ARGS, {} if raw is None else _mapping(raw, f"{FIELD}.staleness"), where=where
    )
    alpha, a, limit = staleness["alpha"], staleness["a"], staleness["max_staleness"]
    check(0.0 < alpha <= 1.0, f"{where}alpha", f"alpha must be in (0, 1], got {alpha}", alpha)
    check(0.0 <= a <= 100.0, f"{where}a", f"a must be from 0 to 100, got {a}", a)
    # Refusing by staleness is what keeps duplicate detection exact: every update that
    # is still young enough to be applied is among the last HISTORY_LIMIT ones.
    check(
        0 <= limit <= HISTORY_LIMIT,
        f"{where}max_staleness",
        f"max_staleness must be from 0 to {HISTORY_LIMIT}, got {limit}",
        limit,
    )
    return AggregationSpec(
        mode="async", policy=staleness["policy"], alpha=alpha, a=a, max_staleness=limit
    )


def parse_aggregation(raw: Any) -> AggregationSpec | None:
    """The validated option, or None when the session has none (absent or null)."""
    if raw is None:
        return None
    given = _mapping(raw, FIELD)
    mode = given.get("mode")
    check(
        isinstance(mode, str) and mode in MODES,
        f"{FIELD}.mode",
        f"{FIELD}.mode must be one of {', '.join(MODES)}, got {mode!r}",
        mode,
    )
    return _rounds(given) if mode == "rounds" else _async(given)
