"""Per-key request rate limits (token bucket) and token budgets (in memory).

A limit or budget of 0 means unlimited. Budgets count `total_tokens` reported
by the upstream; a request is refused once the key has used its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api.config import ApiKey
from gateway.api.errors import GatewayError, rate_limited


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Limiter:
    """Admission control for API keys; `now` is a monotonic clock in seconds."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, int] = {}

    def admit(self, key: ApiKey, now: float) -> GatewayError | None:
        """Take one request from the key's bucket, or return the 429 to send."""
        if key.token_budget and self._used.get(key.sha256, 0) >= key.token_budget:
            return rate_limited("budget_exceeded",
                                f"token budget of {key.token_budget} exhausted for this key")
        rpm = key.requests_per_minute
        if not rpm:
            return None
        b = self._buckets.get(key.sha256)
        if b is None:
            b = self._buckets[key.sha256] = _Bucket(float(rpm), now)
        b.tokens = min(float(rpm), b.tokens + (now - b.stamp) * rpm / 60.0)
        b.stamp = now
        if b.tokens < 1.0:
            return rate_limited("rate_limit_exceeded",
                                f"rate limit of {rpm} requests per minute exceeded")
        b.tokens -= 1.0
        return None

    def charge(self, key: ApiKey, tokens: int) -> None:
        """Record tokens used by a completed request."""
        if tokens > 0:
            self._used[key.sha256] = self._used.get(key.sha256, 0) + tokens

    def used(self, key: ApiKey) -> int:
        """Tokens charged to the key so far."""
        return self._used.get(key.sha256, 0)
