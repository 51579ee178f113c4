"""Per-key request rates (token bucket) and token budgets, behind the `Limits` interface.

Rates: each request takes one token from its key's bucket (`admit`; burst one minute).

Budgets: a call reserves, before a byte is forwarded, the most tokens it could use
(`admit_reserve`, with the rate token; the pipeline computes the amount: a bound on the prompt plus the completion
cap), and the reservation counts against the key's budget until the call settles it with
what it really used (`settle`). A reservation that would take used + reserved past the
budget is refused (429 `budget_exceeded`), so concurrent calls together never spend more
than the budget, as long as each stays within its reservation.

A limit or budget of 0 means unlimited. Two implementations of `Limits`:
- `Limiter`, in this process (one replica): its operations contain no await and so are
  atomic on the event loop; it restarts from zero with the process.
- `RedisLimits`, shared by every replica (`[shared] redis_url`): each operation is one Lua
  script, atomic in Redis (`admit_reserve` takes the rate token and makes the reservation
  in one; `settle_and_set` settles and records the receipt in one), on Redis's clock
  (`TIME`), so replicas with skewed clocks share one bucket. A reservation is a field `h:<id>` = `<tokens>:<expiry ms>` of the key's
  budget hash; one left behind by a replica that died mid-call is charged in full when it
  expires (`[shared] hold_seconds`, longer than any call: the call's usage is unknown and
  its reservation bounds it), so a crash never gives tokens back; a live call that outlives
  its reservation (several slow fallbacks) is likewise charged the whole reservation, and
  its late settlement nothing more. Budgets in Redis last as long as Redis keeps them.
  Redis unreachable: the call is refused with 503 `shared_state_unavailable` before anything is forwarded; a
  settlement that cannot reach Redis leaves the reservation to expire and be charged.
  Keys without a limit or budget never touch Redis.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.api import shared
from gateway.api.config import ApiKey
from gateway.api.errors import GatewayError, rate_limited

log = logging.getLogger("gateway.limits")


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass(frozen=True)
class Hold:
    """Tokens reserved for one call against a key's budget (0 for a key without one)."""

    key_sha256: str
    tokens: int
    id: str = ""  # names the reservation in Redis (RedisLimits only)


class Limits(Protocol):
    """Admission control for API keys (`now` is a monotonic clock in seconds)."""

    async def admit(self, key: ApiKey, now: float) -> GatewayError | None:
        """Take one request from the key's bucket, or return the 429 to send."""

    async def admit_reserve(self, key: ApiKey, now: float, tokens: int) -> Hold:
        """`admit`, then `reserve` if admitted, as one atomic step; raises the refusal
        (the same 429 either of them would give)."""

    async def settle(self, hold: Hold, used: int) -> None:
        """Release a reservation and charge what the call really used."""


def budget_exceeded(key: ApiKey, tokens: int, used: int, held: int) -> GatewayError:
    """429 `budget_exceeded` for a reservation of `tokens` that does not fit."""
    return rate_limited("budget_exceeded", f"this call may use up to {tokens} tokens; "
                        f"{max(0, key.token_budget - used - held)} of the key's "
                        f"{key.token_budget} are left (set max_tokens lower)")


def exhausted(key: ApiKey) -> GatewayError:
    """429 `budget_exceeded` for a key whose budget is used up."""
    return rate_limited("budget_exceeded",
                        f"token budget of {key.token_budget} exhausted for this key")


def too_fast(rpm: int) -> GatewayError:
    """429 `rate_limit_exceeded`."""
    return rate_limited("rate_limit_exceeded",
                        f"rate limit of {rpm} requests per minute exceeded")


class Limiter:
    """The in-process `Limits` (see module docstring)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._used: dict[str, int] = {}
        self._held: dict[str, int] = {}

    async def admit(self, key: ApiKey, now: float) -> GatewayError | None:
        """Take one request from the key's bucket, or return the 429 to send."""
        if key.token_budget and self._used.get(key.sha256, 0) >= key.token_budget:
            return exhausted(key)
        rpm = key.requests_per_minute
        if not rpm:
            return None
        b = self._buckets.get(key.sha256)
        if b is None:
            b = self._buckets[key.sha256] = _Bucket(float(rpm), now)
        b.tokens = min(float(rpm), b.tokens + (now - b.stamp) * rpm / 60.0)
        b.stamp = now
        if b.tokens < 1.0:
            return too_fast(rpm)
        b.tokens -= 1.0
        return None

    async def reserve(self, key: ApiKey, tokens: int) -> Hold:
        """Reserve `tokens` against the key's budget, or raise 429 `budget_exceeded`."""
        if not key.token_budget:
            return Hold(key.sha256, 0)
        used, held = self._used.get(key.sha256, 0), self._held.get(key.sha256, 0)
        if used + held + tokens > key.token_budget:
            raise budget_exceeded(key, tokens, used, held)
        self._held[key.sha256] = held + tokens
        return Hold(key.sha256, tokens)

    async def admit_reserve(self, key: ApiKey, now: float, tokens: int) -> Hold:
        """See `Limits.admit_reserve` (nothing awaited in between: atomic)."""
        err = await self.admit(key, now)
        if err is not None:
            raise err
        return await self.reserve(key, tokens)

    async def settle(self, hold: Hold, used: int) -> None:
        """Release a reservation and charge what the call really used."""
        if hold.tokens:
            self._held[hold.key_sha256] -= hold.tokens
        if used > 0:
            self._used[hold.key_sha256] = self._used.get(hold.key_sha256, 0) + used

    def used(self, key: ApiKey) -> int:
        """Tokens charged to the key so far."""
        return self._used.get(key.sha256, 0)


# Each script reads the time from Redis (one clock for every replica) and first charges
# reservations whose replica died (expired `h:` fields), so `used` and `held` are current.
_PURGE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function purge(key)
  local all = redis.call('HGETALL', key)
  local held, charge = 0, 0
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'h:' then
      local v = all[i + 1]
      local sep = string.find(v, ':', 1, true)
      local tokens = tonumber(string.sub(v, 1, sep - 1))
      if tonumber(string.sub(v, sep + 1)) <= now_ms then
        redis.call('HDEL', key, all[i])
        charge = charge + tokens
      else
        held = held + tokens
      end
    end
  end
  if charge > 0 then redis.call('HINCRBY', key, 'used', charge) end
  return held
end
"""
# `take(bucket, rpm)`: whether one request may pass the bucket (a token is taken if so). The
# bucket is full after a minute idle, so it may expire then.
_BUCKET = """
local function take(key, rpm)
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local tokens = tonumber(b[1]) or rpm
  local stamp = tonumber(b[2]) or now_ms
  tokens = math.min(rpm, tokens + math.max(0, now_ms - stamp) * rpm / 60000)
  local ok = tokens >= 1
  if ok then tokens = tokens - 1 end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', tostring(now_ms))
  redis.call('PEXPIRE', key, 120000)
  return ok
end
"""
# KEYS: bucket, budget; ARGV: requests per minute, budget. 0 admitted, 1 budget used up,
# 2 too fast.
_ADMIT = _PURGE + _BUCKET + """
local budget = tonumber(ARGV[2])
if budget > 0 then
  purge(KEYS[2])
  if tonumber(redis.call('HGET', KEYS[2], 'used') or '0') >= budget then return 1 end
end
local rpm = tonumber(ARGV[1])
if rpm == 0 or take(KEYS[1], rpm) then return 0 end
return 2
"""
# `admit` then `reserve`, atomically in one round trip. KEYS: bucket, budget; ARGV: requests
# per minute, budget, tokens, reservation id, its lifetime (ms). {verdict, used, held}:
# 0 admitted (and reserved if the key has a budget), 1 budget used up, 2 too fast,
# 3 reservation refused (the request's rate token stays taken, as with `admit` + `reserve`).
_ADMIT_RESERVE = _PURGE + _BUCKET + """
local budget = tonumber(ARGV[2])
local held, used = 0, 0
if budget > 0 then
  held = purge(KEYS[2])
  used = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
  if used >= budget then return {1, used, held} end
end
local rpm = tonumber(ARGV[1])
if rpm > 0 and not take(KEYS[1], rpm) then return {2, used, held} end
if budget == 0 then return {0, used, held} end
if used + held + tonumber(ARGV[3]) > budget then return {3, used, held} end
redis.call('HSET', KEYS[2], 'h:' .. ARGV[4], ARGV[3] .. ':' .. tostring(now_ms + tonumber(ARGV[5])))
return {0, used, held}
"""
# KEYS: budget; ARGV: reservation id, tokens used. A reservation already expired was charged
# in full by `purge`, which covers the call (it stayed within its reservation).
_SETTLE = """
if redis.call('HDEL', KEYS[1], 'h:' .. ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'used', ARGV[2])
end
return 0
"""
# `_SETTLE`, then SET each further key (ARGV[4], ARGV[5]...) with an expiry of ARGV[3]
# seconds: the settlement is done first and stays done whatever the writes meet (a script
# is not rolled back); a write that fails is counted, not raised. Returns the failures.
_SETTLE_AND_SET = """
if redis.call('HDEL', KEYS[1], 'h:' .. ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'used', ARGV[2])
end
local failed = 0
for i = 2, #KEYS do
  local r = redis.pcall('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[3])
  if type(r) == 'table' and r.err then failed = failed + 1 end
end
return failed
"""
_CHARGED = _PURGE + """
purge(KEYS[1])
return tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
"""


class RedisLimits:
    """The `Limits` every replica shares through Redis (see module docstring)."""

    def __init__(self, client: Any, prefix: str, hold_seconds: int) -> None:
        self._redis = client
        self._prefix = prefix
        self._hold_ms = hold_seconds * 1000
        self._errors = shared.errors()
        self._admit = client.register_script(_ADMIT)
        self._admit_reserve = client.register_script(_ADMIT_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._settle_and_set = client.register_script(_SETTLE_AND_SET)
        self._charged = client.register_script(_CHARGED)

    def _keys(self, key: ApiKey) -> list[str]:
        return [f"{self._prefix}rate:{key.sha256}", f"{self._prefix}budget:{key.sha256}"]

    async def admit(self, key: ApiKey, now: float) -> GatewayError | None:
        """See `Limits.admit`; `now` is unused (Redis's clock is the one clock)."""
        if not (key.requests_per_minute or key.token_budget):
            return None
        try:
            verdict = await self._admit(keys=self._keys(key),
                                        args=[key.requests_per_minute, key.token_budget])
        except self._errors as e:
            return shared.unavailable("the key's rate limit and budget", e)
        if verdict == 1:
            return exhausted(key)
        if verdict == 2:
            return too_fast(key.requests_per_minute)
        return None

    async def admit_reserve(self, key: ApiKey, now: float, tokens: int) -> Hold:
        """See `Limits.admit_reserve`: one script, one round trip; `now` is unused. 503
        `shared_state_unavailable` if Redis cannot answer."""
        if not (key.requests_per_minute or key.token_budget):
            return Hold(key.sha256, 0)
        hold = Hold(key.sha256, tokens if key.token_budget else 0, secrets.token_hex(8))
        try:
            verdict, used, held = await self._admit_reserve(
                keys=self._keys(key), args=[key.requests_per_minute, key.token_budget, tokens,
                                            hold.id, self._hold_ms])
        except self._errors as e:
            raise shared.unavailable("the key's rate limit and budget", e) from None
        if verdict == 1:
            raise exhausted(key)
        if verdict == 2:
            raise too_fast(key.requests_per_minute)
        if verdict == 3:
            raise budget_exceeded(key, tokens, used, held)
        return hold

    async def settle_and_set(self, hold: Hold, used: int, writes: list[tuple[str, bytes]],
                             ttl: int) -> int | None:
        """`settle`, and SET each (key, value) of `writes` with an expiry of `ttl` seconds,
        in one script (one round trip). The settlement comes first and is never undone by
        a write that fails. The number of writes that failed; None if Redis could not be
        reached (the settlement then left to expire, as with `settle`)."""
        try:
            return int(await self._settle_and_set(
                keys=[f"{self._prefix}budget:{hold.key_sha256}", *(k for k, _ in writes)],
                args=[hold.id, used, ttl, *(v for _, v in writes)]))
        except self._errors as e:
            self.settled(hold, e)
            return None

    async def settle(self, hold: Hold, used: int) -> None:
        """See `Limits.settle`. If Redis cannot answer, the reservation stays until it
        expires and is then charged in full (never less than the call used)."""
        if not hold.tokens:
            return
        try:
            await self._settle(keys=[f"{self._prefix}budget:{hold.key_sha256}"],
                               args=[hold.id, used])
        except self._errors as e:
            self.settled(hold, e)

    @staticmethod
    def settled(hold: Hold, e: BaseException) -> None:
        """Log a settlement that could not reach Redis: the reservation will expire and be
        charged in full."""
        log.warning("budget settlement not recorded (%s); the reservation of %d tokens "
                        "will be charged in full when it expires", type(e).__name__, hold.tokens)

    async def charged(self, key: ApiKey) -> int:
        """Tokens charged to the key so far, by every replica."""
        return int(await self._charged(keys=self._keys(key)[1:]))
