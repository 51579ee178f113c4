"""The gateway's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).

Counters live in plain dicts keyed by label tuples and are updated on the event
loop thread only, so recording a request is a few dict operations: no lock, no
registry, no allocation beyond a first-seen key. Gauges that describe state
(lease state per route, outbox depth, log reachability) are not kept here: the
app samples them when `/metrics` is scraped and passes them to `render`.

Invariants:
- Every label value comes from a bounded set the operator or the code defines
  (endpoint names, route ids from the config, stable error codes, HTTP status);
  nothing a caller sends (model names, paths, headers) becomes a label, so a
  caller cannot grow the series count.
- Histograms are cumulative at render time only; `observe` touches one bucket.
- Metric names are documented in docs/gateway.md; renaming one is a breaking change.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PREFIX = "pag_gateway_"
# Seconds: model calls span a few ms (refusals) to minutes (long streams).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
Labels = tuple[tuple[str, str], ...]


class Histogram:
    """Observations in fixed buckets (`BUCKETS`, then +Inf); not cumulative until rendered."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


@dataclass(frozen=True)
class Gauge:
    """A sampled metric: name (without prefix), help text and (labels, value) samples."""

    name: str
    help: str
    samples: Sequence[tuple[Labels, float]]


class Metrics:
    """Request, model-call and refusal counters and latency histograms of one process."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.calls: dict[tuple[str, str, int], int] = {}
        self.refusals: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.inflight = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request to `endpoint` answered with `status` after `seconds`."""
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(endpoint)
        if hist is None:
            hist = self.latency[endpoint] = Histogram()
        hist.observe(seconds)

    def call(self, kind: str, route: str, status: int, code: str | None) -> None:
        """One model call of `kind` on `route` ("" if none) answered with `status`;
        `code` is its refusal code, None when it was served."""
        key = (kind, route, status)
        self.calls[key] = self.calls.get(key, 0) + 1
        if code is not None:
            rkey = (code, route)
            self.refusals[rkey] = self.refusals.get(rkey, 0) + 1

    def render(self, gauges: Iterable[Gauge] = ()) -> bytes:
        """The exposition text: counters, histograms, then the sampled `gauges`."""
        out: list[str] = []
        _family(out, "requests_total", "counter", "HTTP requests by endpoint and status",
                [((("endpoint", e), ("status", str(s))), n)
                 for (e, s), n in sorted(self.requests.items())])
        _family(out, "model_calls_total", "counter",
                "model calls by kind, route (empty: none chosen) and status",
                [((("kind", k), ("route", r), ("status", str(s))), n)
                 for (k, r, s), n in sorted(self.calls.items())])
        _family(out, "refusals_total", "counter",
                "model calls refused or failed, by stable error code and route",
                [((("code", c), ("route", r)), n) for (c, r), n in sorted(self.refusals.items())])
        name = PREFIX + "request_duration_seconds"
        out.append(f"# HELP {name} time from request start to the last byte sent\n"
                   f"# TYPE {name} histogram\n")
        for endpoint, hist in sorted(self.latency.items()):
            lab = f'endpoint="{escape(endpoint)}"'
            running = 0
            for bound, n in zip((*BUCKETS, float("inf")), hist.counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{name}_bucket{{{lab},le="{le}"}} {running}\n')
            out.append(f"{name}_sum{{{lab}}} {hist.total!r}\n{name}_count{{{lab}}} {running}\n")
        _family(out, "inflight_requests", "gauge", "HTTP requests being served now",
                [((), self.inflight)])
        for g in gauges:
            _family(out, g.name, "gauge", g.help, g.samples)
        return "".join(out).encode()


def escape(value: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _family(out: list[str], name: str, typ: str, help_: str,
            samples: Iterable[tuple[Labels, float]]) -> None:
    full = PREFIX + name
    out.append(f"# HELP {full} {help_}\n# TYPE {full} {typ}\n")
    for labels, value in samples:
        lab = ",".join(f'{k}="{escape(v)}"' for k, v in labels)
        out.append(f"{full}{{{lab}}} {_number(value)}\n" if lab
                   else f"{full} {_number(value)}\n")
