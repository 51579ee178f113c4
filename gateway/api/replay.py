"""E2EE replay protection: each (client key, model key, nonce) is accepted once.

A sealed request names its timestamp (accepted within ±`aci.WINDOW` s), so a
nonce must be remembered only until its timestamp leaves the window
(`timestamp + WINDOW`, plus a margin for clock skew between replicas); after
that the timestamp check refuses it anyway.

Two stores, one interface (`claim`):
- `MemoryReplay`: this process only (one replica). Bounded: past
  `max_entries` live nonces it refuses new ones (`ReplayUnavailable`), so a
  flood cannot exhaust memory and no nonce is ever forgotten early.
- `RedisReplay`: shared by every replica (`[e2ee] redis_url`, else
  `[leases] redis_url`); `SET key NX PX ttl` is the atomic claim.

Fail closed: when the store cannot answer (Redis down, memory store full),
`claim` raises `ReplayUnavailable` and the call is refused (503
`e2ee_replay_unavailable`) before any byte goes upstream, because accepting
a request whose nonce could not be recorded would let it be replayed.
"""

from __future__ import annotations

import heapq
import time
from typing import Any, Protocol

SKEW_MARGIN = 5.0
MAX_ENTRIES = 1_000_000


class ReplayUnavailable(Exception):
    """The replay store could not record a nonce; the call must be refused."""


class ReplayStore(Protocol):
    """Where accepted nonces are remembered."""

    async def claim(self, key: str, expires_at: float) -> bool:
        """True the first time `key` is claimed before `expires_at` (epoch s), else False."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryReplay:
    """Accepted nonces in this process, purged as they expire."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            exp, key = heapq.heappop(heap)
            if self._expiry.get(key) == exp:
                del self._expiry[key]

    async def claim(self, key: str, expires_at: float) -> bool:
        """See `ReplayStore.claim`."""
        now = time.time()
        self._purge(now)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self._max:
            raise ReplayUnavailable("the in-process replay cache is full")
        exp = expires_at + SKEW_MARGIN
        self._expiry[key] = exp
        heapq.heappush(self._heap, (exp, key))
        return True

    async def close(self) -> None:
        """Nothing to release."""


class RedisReplay:
    """Accepted nonces in Redis, shared by every replica (keys expire on their own)."""

    def __init__(self, url: str, prefix: str = "pag:e2ee:", client: Any = None) -> None:
        import redis.asyncio as aioredis

        self._redis = client if client is not None else aioredis.from_url(url)
        self._prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError)

    async def claim(self, key: str, expires_at: float) -> bool:
        """See `ReplayStore.claim`; ReplayUnavailable on any Redis failure (fail closed)."""
        ttl_ms = max(1, int((expires_at + SKEW_MARGIN - time.time()) * 1000))
        try:
            ok = await self._redis.set(self._prefix + key, b"1", nx=True, px=ttl_ms)
        except self._errors as e:
            raise ReplayUnavailable(f"redis: {type(e).__name__}") from e
        return bool(ok)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
