"""Robust aggregation: how a round's client updates become one update, before the optimizer.

The option ``aggregation.aggregator``, named as Flower names its strategies:

- ``{"name": "FedAvg"}`` (the default): the weighted average;
- ``{"name": "FedMedian"}``: the coordinate-wise median (Yin et al., 2018);
- ``{"name": "FedTrimmedAvg", "beta": 0.2}``: the coordinate-wise mean after cutting
  ``int(beta * n)`` values off each tail;
- ``{"name": "Krum", "num_malicious_clients": f}``: the one update with the smallest sum
  of squared distances to its ``n - f - 2`` nearest neighbours (Blanchard et al., 2017);
- ``{"name": "MultiKrum", "num_malicious_clients": f, "num_clients_to_keep": m}``: the
  weighted average of the ``m`` best-scored updates;
- ``{"name": "Bulyan", "num_malicious_clients": f}``: Multi-Krum keeps ``n - 2f``, then
  per coordinate the mean of the ``n - 4f`` values closest to their median
  (El Mhamdi et al., 2018).

Flower's strategies aggregate the clients' parameters and feed the result to the server
update; here they aggregate the clients' deltas from the same current parameters, which
is the same thing shifted by a constant (every rule above is translation-equivariant),
and the session's optimizer then steps on the negated result, as for FedAvg.

How many updates a round holds when it closes is bounded below by ``min_clients``, so
every rule's requirement on ``n`` is checked against it when the session is created:
a round can never close with too few updates for its aggregator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import InvalidHyperparameter
from service.core.hparams import Arg, check, resolve

FIELD = "aggregation.aggregator"
NAMES = ("FedAvg", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
_BY_LOWER = {name.lower(): name for name in NAMES}
_ARGS: dict[str, tuple[Arg, ...]] = {
    "FedAvg": (),
    "FedMedian": (),
    "FedTrimmedAvg": (Arg("beta", "float", 0.2, "fraction cut off each tail, in [0, 0.5)"),),
    "Krum": (Arg("num_malicious_clients", "int", 0, "clients assumed malicious (f)"),),
    "MultiKrum": (
        Arg("num_malicious_clients", "int", 0, "clients assumed malicious (f)"),
        Arg("num_clients_to_keep", "int", 1, "best-scored updates averaged (m)"),
    ),
    "Bulyan": (Arg("num_malicious_clients", "int", 0, "clients assumed malicious (f)"),),
}


@dataclass(frozen=True)
class AggregatorSpec:
    name: str = "FedAvg"
    beta: float = 0.2
    num_malicious_clients: int = 0
    num_clients_to_keep: int = 1

    @property
    def is_mean(self) -> bool:
        """Whether the round's running weighted sum is all this aggregator needs."""
        return self.name == "FedAvg"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for arg in _ARGS[self.name]:
            out[arg.name] = getattr(self, arg.name)
        return out


def parse_aggregator(raw: Any, min_clients: int) -> AggregatorSpec:
    """The validated option; ``min_clients`` is the fewest updates a round closes with."""
    if raw is None:
        return AggregatorSpec()
    if not isinstance(raw, Mapping):
        raise InvalidHyperparameter(FIELD, f"{FIELD} must be an object, got {raw!r}", raw)
    given = dict(raw)
    name = given.pop("name", None)
    canonical = _BY_LOWER.get(name.lower()) if isinstance(name, str) else None
    if canonical is None:
        raise InvalidHyperparameter(
            f"{FIELD}.name", f"{FIELD}.name must be one of {', '.join(NAMES)}, got {name!r}", name
        )
    hp = resolve(_ARGS[canonical], given, where=f"{FIELD}.")
    spec = AggregatorSpec(name=canonical, **hp)
    _check(spec, min_clients)
    return spec


def _check(spec: AggregatorSpec, n: int) -> None:
    where = f"{FIELD}."
    beta, f, m = spec.beta, spec.num_malicious_clients, spec.num_clients_to_keep
    check(0.0 <= beta < 0.5, f"{where}beta", f"beta must be in [0, 0.5), got {beta}", beta)
    check(f >= 0, f"{where}num_malicious_clients", f"num_malicious_clients must be >= 0, got {f}")
    # Krum's guarantee against f attackers needs n > 2f + 2; Bulyan's n >= 4f + 3 (Flower
    # skips the round otherwise). With n >= min_clients, checking min_clients makes every
    # round work. Krum without attackers (f = 0) is Flower's, for any n.
    krum = 2 * f + 3 if f > 0 else 1
    needs = {"Krum": krum, "MultiKrum": krum, "Bulyan": 4 * f + 3}.get(spec.name)
    if needs is not None:
        check(
            n >= needs,
            f"{where}num_malicious_clients",
            f"{spec.name} with num_malicious_clients={f} needs rounds of at least {needs} "
            f"updates, but a round may close with min_clients={n}: raise min_clients "
            "(and clients_per_round) or lower num_malicious_clients",
            f,
        )
    if spec.name == "MultiKrum":
        check(
            1 <= m <= n,
            f"{where}num_clients_to_keep",
            f"num_clients_to_keep must be from 1 to min_clients ({n}), got {m}",
            m,
        )


# -- the rules -------------------------------------------------------------------------------


def _stacked(updates: Sequence[Sequence[np.ndarray]], i: int) -> np.ndarray:
    return np.stack([u[i] for u in updates])


def _weighted_mean(
    updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    total = float(sum(weights))
    out = []
    for i in range(len(updates[0])):
        acc = np.zeros_like(updates[0][i])
        for u, w in zip(updates, weights, strict=True):
            acc += w * u[i]
        out.append(acc / total)
    return out


def trim_mean(stacked: np.ndarray, beta: float) -> np.ndarray:
    """The mean along axis 0 without the ``int(beta * n)`` lowest and highest values
    (scipy's ``trim_mean``, as Flower computes it)."""
    n = stacked.shape[0]
    low = int(beta * n)
    high = n - low
    part = np.partition(stacked, (low, high - 1), axis=0)
    result: np.ndarray = np.mean(part[low:high], axis=0)
    return result


def _squared_distances(flat: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Each row of ``flat``'s squared distance to ``row``: one (n, d) difference at a time,
    never an (n, n, d) one."""
    diff = flat - row
    squared: np.ndarray = np.einsum("ij,ij->i", diff, diff)
    return squared


def krum_scores(updates: Sequence[Sequence[np.ndarray]], f: int) -> np.ndarray:
    """Each update's sum of squared distances to its ``n - f - 2`` nearest others."""
    flat = np.stack([np.concatenate([a.ravel() for a in u]) for u in updates])
    distances = np.stack([_squared_distances(flat, row) for row in flat])
    closest = max(1, len(updates) - f - 2)
    scores = []
    for row in distances:
        # Position 0 of the sorted row is the update itself (distance 0), as in Flower.
        nearest = np.argsort(row, kind="stable")[1 : closest + 1]
        scores.append(float(np.sum(row[nearest])))
    return np.asarray(scores)


def multi_krum(updates: Sequence[Sequence[np.ndarray]], f: int, keep: int) -> list[int]:
    """The indices of the ``keep`` best-scored updates, best first."""
    order = np.argsort(krum_scores(updates, f), kind="stable")
    return [int(i) for i in order[:keep]]


def bulyan(updates: Sequence[Sequence[np.ndarray]], f: int) -> tuple[list[np.ndarray], list[int]]:
    n = len(updates)
    theta = n - 2 * f
    beta = theta - 2 * f
    selected = multi_krum(updates, f, theta)
    chosen = [updates[i] for i in selected]
    out = []
    for i in range(len(updates[0])):
        layers = _stacked(chosen, i)
        median = np.median(layers, axis=0)
        nearest = np.argpartition(np.abs(layers - median), beta - 1, axis=0)[:beta]
        out.append(np.mean(np.take_along_axis(layers, nearest, axis=0), axis=0))
    return out, selected


def aggregate(
    spec: AggregatorSpec, updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> tuple[list[np.ndarray], list[int] | None]:
    """The round's aggregated delta (float64), and which updates it kept (Krum family) or
    None (every update takes part)."""
    if not updates:
        raise ValueError("a round aggregates at least one update")
    name = spec.name
    if name == "FedMedian":
        return [np.median(_stacked(updates, i), axis=0) for i in range(len(updates[0]))], None
    if name == "FedTrimmedAvg":
        return [trim_mean(_stacked(updates, i), spec.beta) for i in range(len(updates[0]))], None
    if name in ("Krum", "MultiKrum"):
        keep = 1 if name == "Krum" else spec.num_clients_to_keep
        selected = multi_krum(updates, spec.num_malicious_clients, keep)
        kept = [updates[i] for i in selected]
        return _weighted_mean(kept, [weights[i] for i in selected]), selected
    if name == "Bulyan":
        return bulyan(updates, spec.num_malicious_clients)
    return _weighted_mean(updates, weights), None
