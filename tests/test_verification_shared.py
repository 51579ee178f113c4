"""Leases shared by replicas through the real Redis at 127.0.0.1:6379 (skipped if absent)."""

from __future__ import annotations

import asyncio
import secrets
from types import SimpleNamespace

import httpx
import pytest

from gateway.verification import registry, shared
from gateway.verification.base import Lease, VerificationError
from gateway.verification.lease import LeaseStore
from gateway.verification.shared import SharedLeases

REDIS = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


pytestmark = pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []

    async def fake(client: object, route: SimpleNamespace, policy: object, now: float) -> Lease:
        seen.append(route.id)
        await asyncio.sleep(0.05)
        if route.provider == "bad":
            raise VerificationError("quote_invalid", "fake says no")
        return Lease(route.id, route.provider, "fake", "00", "tls-spki:" + secrets.token_hex(32),
                     now, now + 100, facts={"simulated": False})

    monkeypatch.setitem(registry.ADAPTERS, "fake", fake)
    return seen


def _route(**policy: object) -> SimpleNamespace:
    return SimpleNamespace(id="r1", provider="p", base_url="https://127.0.0.1:1", evidence="fake",
                           upstream_model="u", attestation_url="",
                           policy={"max_lease_age": 100, **policy})


def _replicas(n: int, key: bytes | None = None) -> tuple[list[LeaseStore], str]:
    prefix = f"pag-test:{secrets.token_hex(6)}:"
    key = key or secrets.token_bytes(32)
    return [LeaseStore(client=httpx.AsyncClient(),
                       shared=SharedLeases(REDIS, key, prefix)) for _ in range(n)], prefix


async def _close(stores: list[LeaseStore], prefix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS)
    async for k in r.scan_iter(prefix + "*"):
        await r.delete(k)
    await r.aclose()
    for s in stores:
        await s.close()


def test_replicas_verify_a_route_once_between_them(calls: list[str]) -> None:
    async def run() -> list[Lease]:
        stores, prefix = _replicas(3)
        try:
            return await asyncio.gather(*(s.ensure(_route(), 1000.0) for s in stores for _ in range(5)))
        finally:
            await _close(stores, prefix)

    leases = asyncio.run(run())
    assert calls == ["r1"]
    assert len({lease.lease_id for lease in leases}) == 1


def test_a_replica_waiting_adopts_a_lease_verified_after_its_call_began(calls: list[str]
                                                                        ) -> None:
    """B's call begins at now = 1000.0 while A, whose call began 20 ms later, verifies:
    the lease A verifies is stamped 1000.02, after B's `now`, and B still adopts it."""
    async def run() -> tuple[Lease, Lease]:
        (a, b), prefix = _replicas(2)
        try:
            first = asyncio.create_task(a.ensure(_route(), 1000.02))
            await asyncio.sleep(0.01)  # A holds the shared lock and is verifying
            return await first, await b.ensure(_route(), 1000.0)
        finally:
            await _close([a, b], prefix)

    on_a, on_b = asyncio.run(run())
    assert calls == ["r1"]
    assert on_a.lease_id == on_b.lease_id


def test_a_lease_stamped_far_ahead_is_not_adopted() -> None:
    async def run() -> list[Lease | None]:
        prefix = f"pag-test:{secrets.token_hex(6)}:"
        store = SharedLeases(REDIS, secrets.token_bytes(32), prefix)
        lease = Lease("r1", "p", "fake", "00", "tls-spki:" + "ab" * 32, 1100.0, 1200.0)
        try:
            await store.put(_route(), lease, 1000.0)
            return [await store.get(_route(), t) for t in (1000.0, 1080.0, 1199.0, 1200.0)]
        finally:
            await _close([], prefix)
            await store.close()

    got = asyncio.run(run())
    assert got[0] is None  # 100 s ahead of this replica's clock: not adopted
    assert got[1] is not None and got[2] is not None  # within shared.AHEAD, then valid
    assert got[3] is None  # expired


def test_forged_or_foreign_entries_are_ignored(calls: list[str]) -> None:
    async def run() -> tuple[Lease, Lease, Lease]:
        stores, prefix = _replicas(1)
        other = SharedLeases(REDIS, secrets.token_bytes(32), prefix)  # a writer without our key
        route = _route()
        forged = Lease("r1", "p", "fake", "00", "tls-spki:" + "66" * 32, 1000.0, 1100.0)
        await other.put(route, forged, 1000.0)
        try:
            mine = await stores[0].ensure(route, 1000.0)  # ignores the forged entry
            changed = _route(max_lease_age=50)  # other settings: the stored lease is not for them
            stores.append(LeaseStore(client=httpx.AsyncClient(), shared=SharedLeases(
                REDIS, stores[0]._shared._key, prefix)))  # type: ignore[union-attr]
            fresh = await stores[1].ensure(changed, 1000.0)
            return forged, mine, fresh
        finally:
            await other.close()
            await _close(stores, prefix)

    forged, mine, fresh = asyncio.run(run())
    assert mine.binding != forged.binding
    assert fresh.lease_id != mine.lease_id
    assert calls == ["r1", "r1"]


def test_seal_rejects_tampering_and_other_routes() -> None:
    key = secrets.token_bytes(32)
    lease = Lease("r1", "p", "fake", "00", "tls-spki:" + "ab" * 32, 1.0, 2.0)
    value = shared.seal(lease, "d" * 64, key)
    assert shared.unseal(value, "r1", "d" * 64, key) == lease
    assert shared.unseal(value.replace(b"abab", b"abac", 1), "r1", "d" * 64, key) is None
    assert shared.unseal(value, "r2", "d" * 64, key) is None
    assert shared.unseal(value, "r1", "e" * 64, key) is None
    assert shared.unseal(value, "r1", "d" * 64, secrets.token_bytes(32)) is None


def test_invalidate_drops_the_shared_lease_but_not_a_newer_one(calls: list[str]) -> None:
    async def run() -> tuple[Lease, Lease, Lease]:
        (a, b), prefix = _replicas(2)
        route = _route()
        try:
            old = await a.ensure(route, 1000.0)
            await a.invalidate(route, old.lease_id)
            new = await b.ensure(route, 1000.0)  # B finds nothing shared: verifies
            await a.invalidate(route, old.lease_id)  # a late invalidation of the old lease
            again = await a.ensure(route, 1000.0)  # adopts B's lease
            return old, new, again
        finally:
            await _close([a, b], prefix)

    old, new, again = asyncio.run(run())
    assert calls == ["r1", "r1"]
    assert new.lease_id != old.lease_id and again.lease_id == new.lease_id


def test_expired_shared_lease_is_not_adopted(calls: list[str]) -> None:
    async def run() -> tuple[Lease, Lease]:
        (a, b), prefix = _replicas(2)
        try:
            first = await a.ensure(_route(), 1000.0)
            later = await b.ensure(_route(), 1100.0)  # at expires_at: never valid
            return first, later
        finally:
            await _close([a, b], prefix)

    first, later = asyncio.run(run())
    assert later.lease_id != first.lease_id and later.verified_at == 1100.0
    assert calls == ["r1", "r1"]


def test_redis_down_means_local_verification_not_failure(calls: list[str]) -> None:
    async def run() -> tuple[Lease, int]:
        sl = SharedLeases("redis://127.0.0.1:1/0", secrets.token_bytes(32))
        store = LeaseStore(client=httpx.AsyncClient(), shared=sl)
        try:
            return await store.ensure(_route(), 1000.0), sl.errors
        finally:
            await store.close()

    lease, errors = asyncio.run(run())
    assert lease.route_id == "r1" and calls == ["r1"] and errors >= 1


def test_failed_verification_is_not_shared(calls: list[str]) -> None:
    async def run() -> None:
        (a, b), prefix = _replicas(2)
        route = _route()
        route.provider = "bad"
        try:
            for s in (a, b):
                with pytest.raises(VerificationError):
                    await s.ensure(route, 1000.0)
        finally:
            await _close([a, b], prefix)

    asyncio.run(run())
    assert calls == ["r1", "r1"]
