"""Leases shared by gateway replicas through Redis.

Replicas of one gateway verify a route once between them: a lease verified
by one replica is stored in Redis and used by the others until it expires.
Redis is a cache, not a trust anchor: every entry carries an HMAC-SHA256
under a key all replicas derive from the same dstack KMS path (so it stays
inside the attested workloads), and names the route and the digest of the
route's verification settings. An entry whose MAC, route or settings differ
is ignored, as is an expired one. If Redis is unreachable, each replica
simply verifies for itself (never a reason to serve unverified).

Keys: `<prefix><route_id>:<settings digest>` (the lease, PX = time left) and
the same with `:lock` (one replica verifies at a time; PX bounded).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import asdict
from typing import Any

import rfc8785

from gateway.verification.base import Lease

log = logging.getLogger("gateway.leases")

LOCK_MS = 30_000
AHEAD = 30.0  # s: a stored lease stamped this far after `now` is still adopted (below)
_DROP_IF_SAME = """
local v = redis.call('GET', KEYS[1])
if v and string.find(v, ARGV[1], 1, true) then return redis.call('DEL', KEYS[1]) end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def settings_digest(route: Any) -> str:
    """SHA-256 of what a lease depends on: provider, URLs, the upstream model it serves,
    evidence kind and policy (JCS). Two routes that differ in any of these never share a
    lease (a lease binds the model it serves)."""
    doc = {"provider": route.provider, "base_url": route.base_url,
           "attestation_url": getattr(route, "attestation_url", None) or "",
           "upstream_model": route.upstream_model,
           "evidence": route.evidence, "policy": dict(getattr(route, "policy", {}) or {})}
    return hashlib.sha256(rfc8785.dumps(doc)).hexdigest()


def seal(lease: Lease, digest: str, key: bytes) -> bytes:
    """The Redis value: JCS of the lease and its settings digest, a dot, the hex MAC."""
    body = rfc8785.dumps({"lease": asdict(lease), "settings": digest})
    return body + b"." + hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def unseal(value: bytes, route_id: str, digest: str, key: bytes) -> Lease | None:
    """The lease in a Redis value, or None if its MAC, route or settings are not ours."""
    body, sep, mac = value.rpartition(b".")
    if not sep or not hmac.compare_digest(
            hmac.new(key, body, hashlib.sha256).hexdigest().encode(), mac):
        return None
    try:
        doc = json.loads(body)
        lease = Lease(**doc["lease"])
    except (ValueError, TypeError, KeyError):
        return None
    if doc.get("settings") != digest or lease.route_id != route_id:
        return None
    return lease


class SharedLeases:
    """The Redis side of LeaseStore (see module docstring)."""

    def __init__(self, url: str, mac_key: bytes, prefix: str = "pag:lease:") -> None:
        import redis.asyncio as aioredis

        if len(mac_key) < 32:
            raise ValueError("the lease MAC key must be at least 32 bytes")
        self._redis = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._key = mac_key
        self._prefix = prefix
        self.errors = 0

    def _name(self, route: Any) -> tuple[str, str]:
        d = settings_digest(route)
        return f"{self._prefix}{route.id}:{d}", d

    async def get(self, route: Any, now: float) -> Lease | None:
        """A lease another replica stored that has not expired at `now`, or None.

        Its `verified_at` may be after `now` by up to `AHEAD` seconds: a replica whose call
        began at `now` waits while another verifies, and that lease is stamped with the
        other call's later start (or a clock a little ahead); refusing it would make every
        waiter verify again. A lease stamped further ahead is ignored."""
        name, d = self._name(route)
        try:
            value = await self._redis.get(name)
        except Exception as e:  # noqa: BLE001 - a cache miss, never a failure
            self._down(e)
            return None
        lease = unseal(value, route.id, d, self._key) if value else None
        if lease is None or not lease.valid_at(max(now, min(lease.verified_at, now + AHEAD))):
            return None
        return lease

    async def put(self, route: Any, lease: Lease, now: float) -> None:
        """Store a freshly verified lease until it expires."""
        name, d = self._name(route)
        ttl_ms = int((lease.expires_at - now) * 1000)
        if ttl_ms <= 0:
            return
        try:
            await self._redis.set(name, seal(lease, d, self._key), px=ttl_ms)
        except Exception as e:  # noqa: BLE001
            self._down(e)

    async def drop(self, route: Any, lease_id: str) -> None:
        """Delete the stored lease if it is still `lease_id` (not a newer one)."""
        name, _ = self._name(route)
        try:
            await self._redis.eval(_DROP_IF_SAME, 1, name, f'"lease_id":"{lease_id}"')
        except Exception as e:  # noqa: BLE001
            self._down(e)

    async def lock(self, route: Any) -> str | None:
        """A token if this replica may verify the route now; None if another one is."""
        name, _ = self._name(route)
        token = secrets.token_hex(16)
        try:
            ok = await self._redis.set(name + ":lock", token, nx=True, px=LOCK_MS)
        except Exception as e:  # noqa: BLE001 - Redis down: verify locally
            self._down(e)
            return token
        return token if ok else None

    async def unlock(self, route: Any, token: str) -> None:
        """Release a lock this replica holds."""
        name, _ = self._name(route)
        try:
            await self._redis.eval(_UNLOCK, 1, name + ":lock", token)
        except Exception as e:  # noqa: BLE001
            self._down(e)

    async def wait(self, route: Any, now: float, timeout: float) -> Lease | None:
        """Poll for the lease another replica is verifying (None if it gave up or failed)."""
        name, _ = self._name(route)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            lease = await self.get(route, now)
            if lease is not None:
                return lease
            try:
                if not await self._redis.exists(name + ":lock"):
                    return await self.get(route, now)
            except Exception as e:  # noqa: BLE001
                self._down(e)
                return None
            await asyncio.sleep(0.05)
        return None

    def _down(self, e: Exception) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 100 == 0:
            log.warning("shared lease cache unavailable (%s); verifying locally",
                        type(e).__name__)

    async def close(self) -> None:
        """Close the Redis connection pool."""
        await self._redis.aclose()
