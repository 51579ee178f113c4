"""Readiness (`GET /readyz`): is every dependency of a model call reachable right now?

A `Probe` is an async function that returns when its dependency works and
raises otherwise; the gateway's probes (built by `gateway serve`) are:

- `outbox`: a real commit through the outbox's writer (receipts can be stored);
- `log`: the log answers `GET /checkpoint` with a checkpoint signed by its key;
- `key_agent`: the dstack guest agent answers `Info`;
- `shipper`: the receipt shipper process is running;
- `shared_redis` (only with `[shared] redis_url`; required): Redis answers PING. Without
  it no call with a rate limit, budget or E2EE nonce can be served (they fail closed);
- `leases_redis` (only with `[leases] redis_url`; optional): Redis answers PING.

Invariants:
- Ready means every *required* probe passed within `timeout`; an optional probe
  is reported but never makes the gateway unready (the lease cache: replicas
  verify for themselves without it).
- The answer is computed at most once per `ttl` (concurrent callers share one
  run), so an unauthenticated caller cannot turn `/readyz` into load on the
  log or the guest agent.
- A failure is shown as its exception type and message, which name hosts and
  files, never request content.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Probe = Callable[[], Awaitable[None]]
TIMEOUT = 2.0
TTL = 1.0


@dataclass(frozen=True)
class Check:
    """One dependency to probe."""

    name: str
    probe: Probe
    required: bool = True


class Readiness:
    """Runs the checks (all at once, each bounded by `timeout`), caching the verdict."""

    def __init__(self, checks: list[Check], timeout: float = TIMEOUT, ttl: float = TTL) -> None:
        self.checks = checks
        self.timeout = timeout
        self.ttl = ttl
        self._at = float("-inf")
        self._last: tuple[bool, dict[str, Any]] = (False, {})
        self._running: asyncio.Task[tuple[bool, dict[str, Any]]] | None = None

    async def verdict(self) -> tuple[bool, dict[str, Any]]:
        """(ready, {name: {"ok", "required", "error"?}}), at most `ttl` seconds old."""
        if time.monotonic() - self._at < self.ttl:
            return self._last
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        task = self._running
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._running is task:
                self._running = None

    async def _run(self) -> tuple[bool, dict[str, Any]]:
        results = await asyncio.gather(*(self._one(c) for c in self.checks))
        checks = {c.name: r for c, r in zip(self.checks, results, strict=True)}
        ready = all(r["ok"] for c, r in zip(self.checks, results, strict=True) if c.required)
        self._last, self._at = (ready, checks), time.monotonic()
        return self._last

    async def _one(self, check: Check) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": True, "required": check.required}
        try:
            await asyncio.wait_for(check.probe(), self.timeout)
        except TimeoutError:
            out.update(ok=False, error=f"no answer within {self.timeout:g} s")
        except Exception as e:  # noqa: BLE001 - any failure of a dependency is "not ready"
            out.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        return out


def log_probe(url: str, vkey: str | None) -> Probe:
    """Readiness probe: the log serves a checkpoint (signed by `vkey` when configured)."""
    import httpx

    from tlog import checkpoint, note

    verifier = note.verifier_from_vkey(vkey) if vkey else None

    async def probe() -> None:
        async with httpx.AsyncClient(timeout=2.0) as c:
            r = await c.get(url.rstrip("/") + "/checkpoint")
        if r.status_code != 200:
            raise RuntimeError(f"GET /checkpoint answered {r.status_code}")
        if verifier is not None:
            checkpoint.open(r.content, verifier)
    return probe


def agent_probe(agent: Any) -> Probe:
    """Readiness probe: the dstack guest agent answers `Info`."""
    async def probe() -> None:
        await agent.info()
    return probe


def redis_probe(url: str) -> Probe:
    """Readiness probe: Redis answers PING."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    async def probe() -> None:
        await client.ping()
    return probe
