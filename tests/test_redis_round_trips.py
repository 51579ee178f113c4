"""Redis round trips per gateway call with `[shared]`, against the real Redis at
127.0.0.1:6379: a call by a key with a rate limit and a budget makes two (admit and
reserve in one script; settle and the receipt-index write in another), and a failed
index write does not skip the settlement.

A round trip is one write of packed commands to the Redis socket (a pipeline is one);
counted by wrapping the client's connection class. Each test uses its own key prefix and
deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection

from gateway.api import pipeline, shared
from gateway.api.apikeys import hash_key
from gateway.api.config import ApiKey, SharedSettings
from gateway.api.ratelimit import RedisLimits
from gateway.api.receipt_index import RedisReceiptIndex
from tests.test_pipeline_steps import (
    ANSWER,
    API_KEY,
    AUTH,
    CHAT,
    Messages,
    body,
    reply,
    scope,
    services,
)

LIVE = SharedSettings(redis_url="redis://127.0.0.1:6379/0")
LIMITED = ApiKey("limited", hash_key(API_KEY), requests_per_minute=600, token_budget=100_000)
MAC_KEY = b"k" * 32


class Counted:
    """Counts writes to Redis sockets while patched in (`pytest.MonkeyPatch`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        send = AbstractConnection.send_packed_command

        async def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            self.n += 1
            await send(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)


def run_calls(ttl: int, calls: int, counter: Counted) -> tuple[list[int], list[int], Any, Any]:
    """Serve `calls` chat calls through `model_call` with Redis limits and index (receipt
    TTL `ttl`); (statuses, round trips per call, the key's charge, the index lookups)."""
    async def go() -> tuple[list[int], list[int], Any, Any]:
        client = shared.connect(LIVE)
        try:
            await client.ping()
        except shared.errors():
            await client.aclose()
            pytest.skip("Redis is not running at 127.0.0.1:6379")
        prefix = f"pag:test:{secrets.token_hex(6)}:"
        svc = services(key=LIMITED)
        svc.limiter = limiter = RedisLimits(client, prefix, 900)
        svc.receipt_index = index = RedisReceiptIndex(client, prefix, MAC_KEY, ttl)
        svc.upstream.answers["r1"] = reply(json.dumps(ANSWER).encode())  # type: ignore[union-attr]
        statuses, trips = [], []
        try:
            for _ in range(calls):
                sent: list[dict[str, Any]] = []

                async def send(m: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
                    sent.append(m)

                before = counter.n
                await pipeline.model_call(svc, scope((b"authorization", AUTH)),
                                          Messages(body(json.dumps(CHAT).encode())), send,
                                          "chat")
                trips.append(counter.n - before)
                statuses.append(sent[0]["status"])
            charged = await limiter.charged(LIMITED)
            found = [await index.get(p[0]) for p in svc.outbox.puts]  # type: ignore[attr-defined]
            return statuses, trips, charged, (found, index.failures)
        finally:
            stale = [k async for k in client.scan_iter(match=prefix + "*")]
            if stale:
                await client.delete(*stale)
            await client.aclose()
    return asyncio.run(go())


def test_a_limited_call_makes_two_redis_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Counted(monkeypatch)
    statuses, trips, charged, (found, failures) = run_calls(3600, 3, counter)
    assert statuses == [200, 200, 200]
    # the first call also loads the admit+reserve script (EVALSHA, NOSCRIPT, EVAL)
    assert trips[1:] == [2, 2]
    assert charged == 3 * ANSWER["usage"]["total_tokens"]  # type: ignore[index]
    assert all(f is not None and f.key_sha256 == LIMITED.sha256 for f in found)
    assert failures == 0


def test_a_failed_index_write_still_settles_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Counted(monkeypatch)
    # an expiry of 0 seconds: Redis refuses both index writes, in the settlement's script
    statuses, trips, charged, (found, failures) = run_calls(0, 2, counter)
    assert statuses == [200, 200]
    assert trips[1:] == [2]
    assert charged == 2 * ANSWER["usage"]["total_tokens"]  # type: ignore[index]
    assert found == [None, None] and failures == 2
