"""FedAsync's staleness weighting (Xie, Koyejo, Gupta, "Asynchronous Federated
Optimization", 2019).

An update trained from version ``tau`` arriving at version ``t`` has staleness
``s = t - tau`` and is mixed in with weight ``alpha_t = alpha * s(t - tau)``:

- constant: ``s(x) = 1``;
- polynomial: ``s(x) = (1 + x) ** -a``.

For a client that sends its new parameters ``x_new`` this is FedAsync's
``x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new`` when the session's optimizer takes plain
steps of size 1 along the pseudo-gradient (FedAvg, or SGD with lr 1).
"""

from __future__ import annotations

from service.core.federated.spec import AggregationSpec


def staleness_weight(spec: AggregationSpec, staleness: int) -> float:
    """The mixing weight of an update ``staleness`` versions behind (0 = fresh)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if spec.policy == "polynomial":
        return float(spec.alpha * (1.0 + staleness) ** -spec.a)
    return float(spec.alpha)
