"""`GET /.well-known/attestation` without exhausting the TEE: every quote costs the guest
agent real work, and the endpoint is unauthenticated.

- Without a nonce the document is the same for everyone: it is made once and cached for
  `ttl` seconds (one quote in flight at a time; concurrent requests share it). The keyset
  it attests is fixed for the life of the process, so only the TTL refreshes it.
- With a nonce each request needs its own quote: it is admitted by a token bucket per
  client address (`per_client_per_minute`, burst the same) and a global one
  (`global_per_second`, burst the same); beyond either the request gets 429
  `rate_limit_exceeded` and no quote is made. At most `MAX_CLIENTS` client buckets are
  kept (the oldest is forgotten first).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.api.errors import GatewayError, rate_limited

Attest = Callable[[str | None], Awaitable[dict[str, Any]]]
MAX_CLIENTS = 10_000


@dataclass
class Bucket:
    """A token bucket: `rate` tokens per second, holding at most `burst`."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class AttestationDocuments:
    """The attestation endpoint's documents (see module docstring)."""

    def __init__(self, attest: Attest, *, ttl: float, per_client_per_minute: int,
                 global_per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._attest = attest
        self._ttl = ttl
        self._per_client = per_client_per_minute
        self._clock = clock
        self._global = Bucket(float(global_per_second), float(global_per_second),
                              float(global_per_second), clock())
        self._clients: OrderedDict[str, Bucket] = OrderedDict()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self.quotes = 0  # quotes asked of the TEE so far

    async def document(self, nonce: str | None, client: str) -> dict[str, Any]:
        """The document for `nonce` (None: the shared one), or 429 for a nonce beyond the
        limits."""
        if nonce is None:
            return await self._shared()
        self._admit(client)
        self.quotes += 1
        return await self._attest(nonce)

    async def _shared(self) -> dict[str, Any]:
        async with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._ttl:
                self.quotes += 1
                self._cached = (now, await self._attest(None))
            return self._cached[1]

    def _admit(self, client: str) -> None:
        now = self._clock()
        bucket = self._clients.get(client)
        if bucket is None:
            rate = self._per_client / 60.0
            bucket = Bucket(rate, float(self._per_client), float(self._per_client), now)
            self._clients[client] = bucket
            if len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        if not bucket.take(now):
            raise self._refusal(f"at most {self._per_client} attestations with a nonce per "
                                "minute from one address")
        if not self._global.take(now):
            bucket.tokens += 1.0  # not this client's fault: give its token back
            raise self._refusal("too many attestations with a nonce right now")

    @staticmethod
    def _refusal(message: str) -> GatewayError:
        return rate_limited("rate_limit_exceeded", message + "; retry later, or omit the "
                            "nonce to get the shared (cached) document")
