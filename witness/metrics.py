"""The witness's Prometheus metrics (`GET /metrics`).

| name | type | labels | meaning |
|---|---|---|---|
| `witness_http_requests_total` | counter | `route`, `status` | HTTP requests answered |
| `witness_cosignatures_total` | counter | `origin` | checkpoints cosigned |
| `witness_refusals_total` | counter | `status` | add-checkpoint refusals (400 … 422) |
| `witness_log_size` | gauge | `origin` | the size last cosigned for each configured log |
| `witness_forks` | gauge | | forks recorded as evidence (GET /forks) |

The state gauges (`witness_log_size`, `witness_forks`) are left out of a
scrape while the state database cannot be read; the counters stay.
`origin` takes only configured origins (a refusal for an unknown one is
counted by status alone), and `route` is one of ROUTES, so no client can
grow the set of label values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tlog.service import RequestCounter
from witness.state import StateError

if TYPE_CHECKING:
    from witness.server import Witness

ROUTES = {"/add-checkpoint": "add-checkpoint", "/": "status", "/forks": "forks",
          "/metrics": "metrics", "/healthz": "healthz", "/readyz": "readyz"}


class WitnessMetrics(Collector):
    """Counters kept per request and per verdict, gauges read from the state at scrape time."""

    def __init__(self, witness: Witness) -> None:
        self.witness = witness
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("witness_http_requests", "HTTP requests answered, by route "
                                "and status", ["route", "status"], registry=self.registry)
        self.record = RequestCounter(self.requests, lambda path: ROUTES.get(path, "other"))
        """service.Recorder for every answered request."""
        self.refusals = Counter("witness_refusals", "add-checkpoint refusals, by status",
                                ["status"], registry=self.registry)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        cosigned = CounterMetricFamily("witness_cosignatures", "Checkpoints cosigned, by log",
                                       labels=["origin"])
        for origin in sorted(self.witness.logs):
            cosigned.add_metric([origin], self.witness.cosigned[origin])
        yield cosigned
        try:  # read from the state database: left out while it cannot be read
            state = self.witness.state
            sizes = [(origin, state.get(origin)[0]) for origin in sorted(self.witness.logs)]
            forks = state.fork_count()
        except StateError:
            return
        size = GaugeMetricFamily("witness_log_size", "Size last cosigned, by log",
                                 labels=["origin"])
        for origin, n in sizes:
            size.add_metric([origin], n)
        yield size
        yield GaugeMetricFamily("witness_forks", "Forks recorded as evidence", value=forks)
