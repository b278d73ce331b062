"""Prometheus metrics on the app's own registry (never the process-global one).

A registry per app keeps test apps from colliding and lets ``/metrics`` show exactly this
server's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# A ``<counter>_created`` series per counter and label set doubles what a scrape carries
# and says only when the process started; Prometheus reads restarts from the counters.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "optserve_http_requests",
            "HTTP requests answered, by route template, method and status",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "optserve_http_request_duration_seconds",
            "Time from request start to the end of the response, by route and method",
            ("route", "method"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.steps = Counter(
            "optserve_steps",
            "Step requests answered with 2xx, by outcome",
            ("outcome",),
            registry=self.registry,
        )
        self.sessions_created = Counter(
            "optserve_sessions_created", "Sessions created or restored", registry=self.registry
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.sessions_deleted = Counter(
            "optserve_sessions_deleted", "Sessions deleted", registry=self.registry
        )
        self._live: Callable[[], int] = lambda: 0
        self._loaded: Callable[[], int] = lambda: 0
        Gauge(
            "optserve_sessions_live",
            "Sessions that exist now, over all tenants",
            registry=self.registry,
        ).set_function(lambda: self._live())
        Gauge(
            "optserve_sessions_loaded",
            "Sessions held in memory now (the others load on their next request)",
            registry=self.registry,
        ).set_function(lambda: self._loaded())

    def track_sessions(self, live: Callable[[], int], loaded: Callable[[], int]) -> None:
        """Read the session gauges from the running service (set when it starts)."""
        self._live, self._loaded = live, loaded

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count and time one answered request (label children cached: this runs per request)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def step_outcome(self, applied: bool, replayed: bool) -> None:
        outcome = "replayed" if replayed else ("applied" if applied else "skipped")
        self.steps.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
