"""The Redis that replicas of one gateway share (`[shared] redis_url`): the connection, the
key layout, and the one refusal used when it cannot answer.

What replicas share, each behind an interface with an in-process twin:

| state | Redis side | in-process side |
|---|---|---|
| rate limits, budgets | `ratelimit.RedisLimits` (one Lua script to admit and reserve, one to settle and index the receipt) | `ratelimit.Limiter` |
| E2EE nonces | `replay.RedisReplay` (`SET NX PX`) | `replay.MemoryReplay` |
| verified leases | `verification.shared.SharedLeases` (MACed) | `verification.lease.LeaseStore` |
| receipt lookups | `receipt_index.RedisReceiptIndex` (MACed, TTL) | the replica's own outbox |
| API key revocations | `apikeys.RedisRevocations` (mirrored each second) | none (the config) |

API keys are not stored in Redis: every replica loads them (as hashes) from the same
configuration, part of the attested app. A key written into Redis would let whoever can
write to Redis mint API keys; the configuration cannot be changed without changing the
compose hash clients pin. Revocations are shared (`apikeys.RedisRevocations`): Redis can
take access away, never grant it.

Keys, under `[shared] prefix` (default `pag:`): `rate:<key sha256>` (token bucket),
`budget:<key sha256>` (used tokens and live reservations), `revoked-keys` (a set of key
hashes), `e2ee:<nonce key>`, `lease:<route>:<settings digest>`, `receipt:<id>` and
`receipt-rh:<request hash>`.

Fail closed: a limit, budget or nonce that cannot be checked in Redis (or a revocation
list older than `apikeys.STALE_AFTER`) refuses the call with 503
`shared_state_unavailable` (or `e2ee_replay_unavailable`) before any byte goes upstream, and `/readyz` reports the `shared_redis` check as failed; only the lease cache
degrades to verifying locally, which is never less safe.
"""

from __future__ import annotations

from typing import Any

from gateway.api.config import SharedSettings
from gateway.api.errors import GatewayError

UNAVAILABLE = "shared_state_unavailable"


def connect(settings: SharedSettings) -> Any:
    """An asyncio Redis client for `settings.redis_url`, every call bounded by its timeout."""
    import redis.asyncio as aioredis

    if settings.redis_url is None:
        raise ValueError("[shared] redis_url is not set")
    return aioredis.from_url(settings.redis_url, socket_timeout=settings.timeout,
                             socket_connect_timeout=settings.timeout)


def errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis cannot answer (connection, timeout, protocol)."""
    import redis

    return (redis.RedisError, OSError, TimeoutError)


def unavailable(what: str, e: BaseException | None = None) -> GatewayError:
    """503 `shared_state_unavailable`: `what` could not be checked in the shared Redis."""
    why = f" ({type(e).__name__})" if e is not None else ""
    return GatewayError(503, UNAVAILABLE, f"the shared state of this gateway's replicas is "
                        f"unreachable, so {what} cannot be checked and the call is refused"
                        f"{why}", type_="server_error")
