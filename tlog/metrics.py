"""The log's Prometheus metrics (`GET /metrics`), each read from the state that decides it.

| name | type | labels | meaning |
|---|---|---|---|
| `tlog_http_requests_total` | counter | `route`, `status` | HTTP requests answered |
| `tlog_append_seconds` | histogram | | POST /add: arrival to acknowledgement (200 only) |
| `tlog_size` | gauge | | entries under the served checkpoint |
| `tlog_served_cosignatures` | gauge | | distinct valid witness cosignatures on it |
| `tlog_sequencer` | gauge | | 1 while this process sequences, else 0 |
| `tlog_append_duplicates_total` | counter | | appends of an entry already held, answered with its index |
| `tlog_append_refusals_total` | counter | `code` | appends not acknowledged, by AppendError code |
| `tlog_witness_cosigned_size` | gauge | `witness` | size the witness last cosigned for us |
| `tlog_witness_lag` | gauge | `witness` | served size minus that size |
| `tlog_witness_cosignatures_total` | counter | `witness` | answers with a valid cosignature |
| `tlog_witness_failures_total` | counter | `witness`, `reason` | answers that gave none |

`route` is one of ROUTES, never the request path, so no client can grow the
set of label values; `code` is one of tlog/sequencer.py's four append error
codes; `witness` is a configured URL and `reason` one of the
witness pool's stable failure labels. Only the sequencer talks to witnesses,
so a replica reports no `tlog_witness_*` samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tlog.sequencer import SEQUENCER
from tlog.service import RequestCounter

if TYPE_CHECKING:
    from tlog.sequencer import Log

ROUTES = {"/checkpoint": "checkpoint", "/add": "add", "/add-batch": "add-batch",
          "/consistency": "consistency", "/": "status", "/metrics": "metrics",
          "/healthz": "healthz", "/readyz": "readyz"}


def route(path: str) -> str:
    """The route label of a request path: a fixed, small set."""
    if path in ROUTES:
        return ROUTES[path]
    if path.startswith("/tile/entries/"):
        return "entries"
    if path.startswith("/tile/"):
        return "tile"
    if path.startswith("/proof/"):
        return "proof"
    return "other"


class LogMetrics(Collector):
    """Counters kept per request, plus gauges read from the log at scrape time."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tlog_http_requests", "HTTP requests answered, by route and "
                                "status", ["route", "status"], registry=self.registry)
        self.record = RequestCounter(self.requests, route)
        """service.Recorder for every answered request."""
        self.append_seconds = Histogram("tlog_append_seconds", "POST /add, arrival to "
                                        "acknowledgement", registry=self.registry)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        log = self.log
        served = log.served
        yield GaugeMetricFamily("tlog_size", "Entries under the served checkpoint",
                                value=served.size)
        yield GaugeMetricFamily("tlog_served_cosignatures", "Distinct valid witness "
                                "cosignatures on the served checkpoint",
                                value=log.cosigners(served))
        yield GaugeMetricFamily("tlog_sequencer", "1 while this process sequences",
                                value=1 if log.role == SEQUENCER else 0)
        yield CounterMetricFamily("tlog_append_duplicates", "Appends of an entry the log "
                                  "already held, answered with its existing index",
                                  value=log.duplicates)
        refused = CounterMetricFamily("tlog_append_refusals", "Appends not acknowledged, by "
                                      "code", labels=["code"])
        for code, n in sorted(log.refusals.items()):
            refused.add_metric([code], n)
        yield refused
        size = GaugeMetricFamily("tlog_witness_cosigned_size", "Size the witness last "
                                 "cosigned for this log", labels=["witness"])
        lag = GaugeMetricFamily("tlog_witness_lag", "Served size minus the size the witness "
                                "last cosigned", labels=["witness"])
        good = CounterMetricFamily("tlog_witness_cosignatures", "Witness answers carrying a "
                                   "valid cosignature", labels=["witness"])
        bad = CounterMetricFamily("tlog_witness_failures", "Witness answers without a valid "
                                  "cosignature, by reason", labels=["witness", "reason"])
        if log.witnesses is not None and log.role == SEQUENCER:  # only it asks witnesses
            for url, st in log.witnesses.status.items():
                size.add_metric([url], st.size)
                lag.add_metric([url], max(0, served.size - st.size))
                good.add_metric([url], st.cosignatures)
                for reason, n in sorted(st.failures.items()):
                    bad.add_metric([url, reason], n)
        yield from (size, lag, good, bad)
