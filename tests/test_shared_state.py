"""The Redis side of the replicas' shared state, against the real Redis at 127.0.0.1:6379:
budgets and rate limits as two replicas see them (two `RedisLimits` on one Redis),
reservations of a replica that died, Redis down, and the receipt index's MAC.

Each test works under its own key prefix and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.api import receipt_index, shared
from gateway.api.apikeys import KeyStore, RedisRevocations, hash_key, revoke
from gateway.api.config import ApiKey, SharedSettings
from gateway.api.errors import GatewayError
from gateway.api.ratelimit import Hold, RedisLimits

LIVE = SharedSettings(redis_url="redis://127.0.0.1:6379/0")
DOWN = SharedSettings(redis_url="redis://127.0.0.1:1/0", timeout=0.5)


def with_redis(test: Callable[[Any, str], Awaitable[None]]) -> None:
    """Run `test(client, prefix)` on the live Redis; skip if there is none; clean up."""
    async def go() -> None:
        client = shared.connect(LIVE)
        try:
            await client.ping()
        except shared.errors():
            await client.aclose()
            pytest.skip("Redis is not running at 127.0.0.1:6379")
        prefix = f"pag:test:{secrets.token_hex(6)}:"
        try:
            await test(client, prefix)
        finally:
            stale = [k async for k in client.scan_iter(match=prefix + "*")]
            if stale:
                await client.delete(*stale)
            await client.aclose()
    asyncio.run(go())


def test_two_replicas_never_reserve_more_than_the_budget_together() -> None:
    key = ApiKey("k", "1" * 64, token_budget=1000)

    async def test(client: Any, prefix: str) -> None:
        a, b = RedisLimits(client, prefix, 900), RedisLimits(client, prefix, 900)

        async def try_reserve(lim: RedisLimits) -> Any:
            try:
                return await lim.admit_reserve(key, 0.0, 70)
            except GatewayError as e:
                assert (e.status, e.code) == (429, "budget_exceeded")
                return None
        holds = await asyncio.gather(*(try_reserve((a, b)[i % 2]) for i in range(40)))
        granted = [h for h in holds if h is not None]
        assert len(granted) == 1000 // 70  # 14 fit, whichever replica asked
        for i, h in enumerate(granted):
            await (a, b)[i % 2].settle(h, 10)
        assert await a.charged(key) == await b.charged(key) == 140
        assert (await a.admit_reserve(key, 0.0, 860)).tokens == 860  # every reservation was released
    with_redis(test)


def test_a_dead_replicas_reservation_is_charged_in_full_when_it_expires() -> None:
    key = ApiKey("k", "2" * 64, token_budget=100)

    async def test(client: Any, prefix: str) -> None:
        dead, alive = RedisLimits(client, prefix, 1), RedisLimits(client, prefix, 1)
        orphan = await dead.admit_reserve(key, 0.0, 60)  # its replica dies: never settled
        with pytest.raises(GatewayError):
            await alive.admit_reserve(key, 0.0, 50)
        await asyncio.sleep(1.2)
        assert await alive.charged(key) == 60  # the bound of the unknown call
        assert await alive.admit(key, 0) is None
        await dead.settle(orphan, 5)  # a settlement after expiry charges nothing more
        assert await alive.charged(key) == 60
        with pytest.raises(GatewayError) as e:
            await alive.admit_reserve(key, 0.0, 41)
        assert e.value.code == "budget_exceeded"
    with_redis(test)


def test_replicas_share_one_bucket_and_an_exhausted_budget() -> None:
    rated = ApiKey("r", "3" * 64, requests_per_minute=4)
    budgeted = ApiKey("b", "4" * 64, token_budget=10)

    async def test(client: Any, prefix: str) -> None:
        a, b = RedisLimits(client, prefix, 900), RedisLimits(client, prefix, 900)
        verdicts = [await (a, b)[i % 2].admit(rated, 0) for i in range(6)]
        assert verdicts[:4] == [None] * 4
        assert [v.code for v in verdicts[4:] if v is not None] == ["rate_limit_exceeded"] * 2
        await a.settle(await a.admit_reserve(budgeted, 0.0, 10), 10)
        refusal = await b.admit(budgeted, 0)
        assert refusal is not None and refusal.code == "budget_exceeded"
        unlimited = ApiKey("u", "5" * 64)
        assert await b.admit(unlimited, 0) is None
        assert (await b.admit_reserve(unlimited, 0.0, 10**9)).tokens == 0
        assert [k async for k in client.scan_iter(match=f"{prefix}*{'5' * 64}")] == []
    with_redis(test)


def test_redis_down_refuses_with_503_before_anything_is_forwarded() -> None:
    key = ApiKey("k", "6" * 64, requests_per_minute=10, token_budget=100)

    async def go() -> None:
        client = shared.connect(DOWN)
        lim = RedisLimits(client, "pag:", 900)
        refusal = await lim.admit(key, 0)
        assert refusal is not None
        assert (refusal.status, refusal.code) == (503, "shared_state_unavailable")
        with pytest.raises(GatewayError) as e:
            await lim.admit_reserve(key, 0.0, 10)
        assert (e.value.status, e.value.code) == (503, "shared_state_unavailable")
        await lim.settle(Hold(key.sha256, 10, "ab"), 5)  # logged; the hold will be charged
        index = receipt_index.RedisReceiptIndex(client, "pag:", b"k" * 32, 60)
        await index.put("0" * 32, "1" * 64, b"{}", "2" * 64)  # best effort: no exception
        assert index.failures == 1
        assert await index.get("0" * 32) is None
        await client.aclose()
    asyncio.run(go())


def test_an_index_record_opens_only_for_its_id_with_its_mac() -> None:
    mac = secrets.token_bytes(32)
    rid, owner, rh, entry = "a" * 32, "b" * 64, "c" * 64, b'{"v":"pag-receipt/2"}'
    value = receipt_index.seal(mac, rid, owner, rh, entry)
    assert receipt_index.unseal(mac, rid, value) == receipt_index.Indexed(rid, rh, entry, owner)
    assert receipt_index.unseal(mac, "d" * 32, value) is None  # moved to another id
    assert receipt_index.unseal(secrets.token_bytes(32), rid, value) is None
    assert receipt_index.unseal(mac, rid, value.replace(owner.encode(), b"e" * 64)) is None
    assert receipt_index.unseal(mac, rid, value[:-1] + b"]") is None  # entry changed
    assert receipt_index.unseal(mac, rid, b"garbage") is None
    assert receipt_index.unseal(mac, rid, b"\xff\xfe \n") is None


def test_revocations_reach_every_replica_and_go_stale_without_redis() -> None:
    key = ApiKey("k", hash_key("sk-r"))

    async def test(client: Any, prefix: str) -> None:
        mirrors = [RedisRevocations(client, prefix, stale_after=0.5) for _ in range(2)]
        stores = [KeyStore([key], m) for m in mirrors]
        assert not any(m.fresh() for m in mirrors)  # nothing read yet: not fit to serve
        for m in mirrors:
            await m.refresh()
        assert all(m.fresh() for m in mirrors)
        assert all(s.lookup(b"Bearer sk-r") == key for s in stores)
        assert await revoke(client, prefix, key.sha256) is True
        assert await revoke(client, prefix, key.sha256) is False  # already
        for m in mirrors:
            await m.refresh()
        assert all(s.lookup(b"Bearer sk-r") is None for s in stores)
        await asyncio.sleep(0.6)
        assert not any(m.fresh() for m in mirrors)  # not refreshed in time: stale
        assert await revoke(client, prefix, key.sha256, undo=True) is True
        await mirrors[0].refresh()
        assert stores[0].lookup(b"Bearer sk-r") == key

    with_redis(test)

    async def unreachable() -> None:
        client = shared.connect(DOWN)
        down = RedisRevocations(client, "pag:")
        with pytest.raises(shared.errors()):
            await down.refresh()
        assert not down.fresh()
        await client.aclose()
    asyncio.run(unreachable())
