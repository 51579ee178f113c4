"""Per-key request rates (token bucket) and token budgets, behind the `Limits` interface.

Rates: each request takes one token from its key's bucket (`admit`; burst one minute).

Budgets: a call reserves, before a byte is forwarded, the most tokens it could use
(`reserve`; the pipeline computes the amount: a bound on the prompt plus the completion
cap), and the reservation counts against the key's budget until the call settles it with
what it really used (`settle`). A reservation that would take used + reserved past the
budget is refused (429 `budget_exceeded`), so concurrent calls together never spend more
than the budget, as long as each stays within its reservation.

A limit or budget of 0 means unlimited. `Limits` is async so that an implementation
shared by gateway replicas (Redis: one script per operation) can stand in for `Limiter`,
the in-process one, whose operations contain no await and so are atomic on the event loop.
Both restart from zero with the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.api.config import ApiKey
from gateway.api.errors import GatewayError, rate_limited


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass(frozen=True)
class Hold:
    """Tokens reserved for one call against a key's budget (0 for a key without one)."""

    key_sha256: str
    tokens: int


class Limits(Protocol):
    """Admission control for API keys (`now` is a monotonic clock in seconds)."""

    async def admit(self, key: ApiKey, now: float) -> GatewayError | None:
        """Take one request from the key's bucket, or return the 429 to send."""

    async def reserve(self, key: ApiKey, tokens: int) -> Hold:
        """Reserve `tokens` against the key's budget, or raise 429 `budget_exceeded`."""

    async def settle(self, hold: Hold, used: int) -> None:
        """Release a reservation and charge what the call really used."""

    def used(self, key: ApiKey) -> int:
        """Tokens charged to the key so far."""


class Limiter:
    """The in-process `Limits` (see module docstring)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, int] = {}
        self._held: dict[str, int] = {}

    async def admit(self, key: ApiKey, now: float) -> GatewayError | None:
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

    async def reserve(self, key: ApiKey, tokens: int) -> Hold:
        """Reserve `tokens` against the key's budget, or raise 429 `budget_exceeded`."""
        if not key.token_budget:
            return Hold(key.sha256, 0)
        used, held = self._used.get(key.sha256, 0), self._held.get(key.sha256, 0)
        if used + held + tokens > key.token_budget:
            raise rate_limited("budget_exceeded", f"this call may use up to {tokens} tokens; "
                               f"{max(0, key.token_budget - used - held)} of the key's "
                               f"{key.token_budget} are left (set max_tokens lower)")
        self._held[key.sha256] = held + tokens
        return Hold(key.sha256, tokens)

    async def settle(self, hold: Hold, used: int) -> None:
        """Release a reservation and charge what the call really used."""
        if hold.tokens:
            self._held[hold.key_sha256] -= hold.tokens
        if used > 0:
            self._used[hold.key_sha256] = self._used.get(hold.key_sha256, 0) + used

    def used(self, key: ApiKey) -> int:
        """Tokens charged to the key so far."""
        return self._used.get(key.sha256, 0)
