"""The one log line of each model call (logger `gateway.calls`, msg `call`).

Every gateway log line is JSON (`tlog.service.JsonFormatter`, set up by
`gateway serve` and the shipper); the call line adds `receipt_id`, `kind`,
`route`, `status`, `code`, `latency_ms`, `e2ee` and `stream`.

Invariant: prompts and completions never reach it: it is built from the
receipt's public facts only (ids, route, codes, timing).
"""

from __future__ import annotations

import logging
import time

from tlog.service import JsonLines

CALLS = logging.getLogger("gateway.calls")


def call(receipt_id: str | None, kind: str, route: str | None, status: int, code: str | None,
         latency_ms: float, e2ee: str, stream: bool) -> None:
    """Log the one line of a model call (receipt id, route, status, code, latency).

    Where `gateway serve`'s JSON handler alone writes it (`JsonLines.sole`), the line goes
    to it directly: the same line, without a `LogRecord` and logging's dispatch. (At 16
    clients, leaving the line out saved the gateway's loop thread about 30 us a call,
    against 5 us for the same line logged in a tight loop: docs/benchmarks-history.md.)"""
    if not CALLS.isEnabledFor(logging.INFO):
        return
    fields = {"receipt_id": receipt_id, "kind": kind, "route": route, "status": status,
              "code": code, "latency_ms": round(latency_ms, 3), "e2ee": e2ee, "stream": stream}
    handler = JsonLines.sole(CALLS, logging.INFO)
    if handler is None:
        CALLS.info("call", extra={"fields": fields})
    else:
        handler.write(handler.formatter.line(time.time(), "info", CALLS.name, "call", fields))
