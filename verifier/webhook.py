"""Alerts POSTed to a webhook from a bounded queue, never from the monitor's poll.

`WebhookQueue.put(alert)` only appends to a queue of at most `capacity` alerts and
returns; one daemon thread POSTs them in order, each with its own timeout. A
webhook that is slow or never answers therefore delays only the posting thread:
the poll goes on. When the queue is full the oldest waiting alert is dropped and
counted (`dropped`), so a hostile log raising an alert per entry cannot grow the
monitor's memory either. Failures are counted (`failed`) and reported on stderr
by exception type only (an alert may quote hostile text). `drain()` waits until
every queued alert was posted or failed (a `--once` run calls it before exiting;
each post still has its own timeout, so it ends).
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any

import httpx

CAPACITY = 1000  # alerts waiting to be posted at most
TIMEOUT = 5.0  # seconds per POST


class WebhookQueue:
    """A bounded, drop-oldest queue of alerts and the one thread that posts them."""

    def __init__(self, url: str, capacity: int | None = None,
                 timeout: float | None = None) -> None:
        self.url = url
        self.timeout = TIMEOUT if timeout is None else timeout
        self.dropped = 0
        self.posted = 0
        self.failed = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._capacity = CAPACITY if capacity is None else capacity
        self._ready = threading.Condition()
        self._busy = False  # the posting thread holds an alert it has not finished
        threading.Thread(target=self._run, name="monitor-webhook", daemon=True).start()

    def put(self, alert: dict[str, Any]) -> None:
        """Queue `alert` for posting; never blocks on the network."""
        with self._ready:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(alert)
            self._ready.notify_all()

    def pending(self) -> int:
        """Alerts queued and not yet taken by the posting thread."""
        with self._ready:
            return len(self._queue)

    def drain(self) -> None:
        """Return once the queue is empty and no post is under way."""
        with self._ready:
            self._ready.wait_for(lambda: not self._queue and not self._busy)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as c:
            while True:
                with self._ready:
                    while not self._queue:
                        self._ready.wait()
                    alert = self._queue.popleft()
                    self._busy = True
                try:
                    c.post(self.url, json=alert).raise_for_status()
                    self.posted += 1
                except httpx.HTTPError as e:
                    self.failed += 1
                    print(f"monitor: webhook failed: {type(e).__name__}", file=sys.stderr)
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()
