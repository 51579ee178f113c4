"""API key authentication: keys are held only as SHA-256 hashes.

Keys come from the configuration only (the same on every replica). Replicas sharing a
Redis (`[shared]`) also share revocations: a key whose hash is in the Redis set
`<prefix>revoked-keys` (`python -m gateway revoke-key`) is refused by every replica within
`REFRESH` seconds. Redis can only take access away, never grant it. A replica that has not
refreshed the set for `STALE_AFTER` seconds refuses every call (503
`shared_state_unavailable`, from `pipeline.admit`) rather than serve a key revoked
meanwhile. Without `[shared]` nothing is revoked at run time: remove the key from the
configuration.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from gateway.api import shared
from gateway.api.config import ApiKey

REFRESH = 1.0
STALE_AFTER = 10.0
REVOKED = "revoked-keys"
log = logging.getLogger("gateway.apikeys")


def hash_key(key: str) -> str:
    """The lower-case hex SHA-256 stored in the config for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(value: bytes | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    if not value:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class Revocations(Protocol):
    """Key hashes revoked at run time."""

    def revoked(self, sha256: str) -> bool:
        """Whether the key with this hash is revoked (as last known)."""
        ...

    def fresh(self) -> bool:
        """Whether what is known of revocations is current enough to serve."""
        ...


class NoRevocations:
    """One replica: keys change with the configuration only."""

    def revoked(self, sha256: str) -> bool:
        """Never."""
        return False

    def fresh(self) -> bool:
        """Always."""
        return True


class RedisRevocations:
    """The replicas' shared set of revoked key hashes, mirrored in this process (see module
    docstring); `run` keeps the mirror current."""

    def __init__(self, client: Any, prefix: str, stale_after: float = STALE_AFTER) -> None:
        self._redis = client
        self._name = prefix + REVOKED
        self._stale_after = stale_after
        self._revoked: frozenset[str] = frozenset()
        self._at = float("-inf")

    def revoked(self, sha256: str) -> bool:
        """See `Revocations.revoked`."""
        return sha256 in self._revoked

    def fresh(self) -> bool:
        """See `Revocations.fresh`: refreshed within `stale_after` seconds."""
        return time.monotonic() - self._at < self._stale_after

    async def refresh(self) -> None:
        """Read the set once (raises what Redis raises)."""
        members = await self._redis.smembers(self._name)
        self._revoked = frozenset(m.decode("ascii", "replace") for m in members)
        self._at = time.monotonic()

    async def run(self, every: float = REFRESH) -> None:
        """Refresh every `every` seconds until cancelled; failures are logged, not raised."""
        failures = 0
        while True:
            try:
                await self.refresh()
                failures = 0
            except shared.errors() as e:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("revoked API keys not refreshed (%s); calls are refused once "
                                "the list is %g s old", type(e).__name__, self._stale_after)
            await asyncio.sleep(every)


async def revoke(client: Any, prefix: str, sha256: str, undo: bool = False) -> bool:
    """Add a key hash to the shared revoked set (or take it out); whether the set changed."""
    name = prefix + REVOKED
    changed = await (client.srem(name, sha256) if undo else client.sadd(name, sha256))
    return bool(changed)


class KeyStore:
    """Looks API keys up by hash; comparison is on hashes, so timing reveals nothing of keys."""

    def __init__(self, keys: Iterable[ApiKey], revocations: Revocations | None = None) -> None:
        self._by_hash = {k.sha256: k for k in keys}
        self.revocations: Revocations = revocations or NoRevocations()

    def lookup(self, authorization: bytes | None) -> ApiKey | None:
        """The API key named by an Authorization header, or None (unknown or revoked)."""
        token = bearer(authorization)
        if token is None:
            return None
        key = self._by_hash.get(hash_key(token))
        return None if key is None or self.revocations.revoked(key.sha256) else key


def admin_ok(authorization: bytes | None, admin_sha256: str | None) -> bool:
    """Whether the header carries the admin key (never true when none is configured)."""
    token = bearer(authorization)
    if token is None or admin_sha256 is None:
        return False
    return hmac.compare_digest(hash_key(token), admin_sha256)
