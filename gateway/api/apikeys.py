"""API key authentication: keys are held only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from gateway.api.config import ApiKey


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


class KeyStore:
    """Looks API keys up by hash; comparison is on hashes, so timing reveals nothing of keys."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_hash = {k.sha256: k for k in keys}

    def lookup(self, authorization: bytes | None) -> ApiKey | None:
        """The API key named by an Authorization header, or None."""
        token = bearer(authorization)
        if token is None:
            return None
        return self._by_hash.get(hash_key(token))


def admin_ok(authorization: bytes | None, admin_sha256: str | None) -> bool:
    """Whether the header carries the admin key (never true when none is configured)."""
    token = bearer(authorization)
    if token is None or admin_sha256 is None:
        return False
    return hmac.compare_digest(hash_key(token), admin_sha256)
