"""The one log line of each model call (logger `gateway.calls`, msg `call`).

Every gateway log line is JSON (`tlog.service.JsonFormatter`, set up by
`gateway serve` and the shipper); the call line adds `receipt_id`, `kind`,
`route`, `status`, `code`, `latency_ms`, `e2ee` and `stream`.

Invariant: prompts and completions never reach it: it is built from the
receipt's public facts only (ids, route, codes, timing).
"""

from __future__ import annotations

import logging

CALLS = logging.getLogger("gateway.calls")


def call(receipt_id: str | None, kind: str, route: str | None, status: int, code: str | None,
         latency_ms: float, e2ee: str, stream: bool) -> None:
    """Log the one line of a model call (receipt id, route, status, code, latency)."""
    if CALLS.isEnabledFor(logging.INFO):
        CALLS.info("call", extra={"fields": {
            "receipt_id": receipt_id, "kind": kind, "route": route, "status": status,
            "code": code, "latency_ms": round(latency_ms, 3), "e2ee": e2ee, "stream": stream}})
