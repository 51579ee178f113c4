"""LeaseStore: one verification in flight per route, never an expired lease, failures fail closed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.verification import registry
from gateway.verification.base import Lease, VerificationError
from gateway.verification.lease import LeaseStore


def _route(**policy: object) -> SimpleNamespace:
    return SimpleNamespace(id="r1", provider="p", base_url="https://127.0.0.1:1", evidence="fake",
                           attestation_url=None, policy={"max_lease_age": 100, "refresh_before": 10,
                                                         **policy})


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    seen: list[float] = []

    async def fake(client: object, route: SimpleNamespace, policy: object, now: float) -> Lease:
        seen.append(now)
        await asyncio.sleep(0.01)
        if route.provider == "bad":
            raise VerificationError("quote_invalid", "fake says no")
        return Lease(route.id, route.provider, "fake", "00", "tls-spki:ab", now, now + 100)

    monkeypatch.setitem(registry.ADAPTERS, "fake", fake)
    return seen


def test_concurrent_ensure_verifies_once(calls: list[float]) -> None:
    async def run() -> list[Lease]:
        store = LeaseStore(client=object())  # type: ignore[arg-type]
        return await asyncio.gather(*(store.ensure(_route(), 1000.0) for _ in range(8)))

    leases = asyncio.run(run())
    assert len(calls) == 1
    assert len({lease.lease_id for lease in leases}) == 1


def test_expired_lease_never_returned(calls: list[float]) -> None:
    async def run() -> tuple[Lease, Lease, Lease | None]:
        store = LeaseStore(client=object())  # type: ignore[arg-type]
        first = await store.ensure(_route(), 1000.0)
        gone = store.get_valid("r1", 1100.0)
        second = await store.ensure(_route(), 1100.0)
        return first, second, gone

    first, second, gone = asyncio.run(run())
    assert gone is None
    assert second.lease_id != first.lease_id and second.valid_at(1100.0)
    assert calls == [1000.0, 1100.0]


def test_failed_verification_is_raised_and_recorded(calls: list[float]) -> None:
    async def run() -> LeaseStore:
        store = LeaseStore(client=object())  # type: ignore[arg-type]
        with pytest.raises(VerificationError) as ei:
            await store.ensure(SimpleNamespace(**{**vars(_route()), "provider": "bad"}), 5.0)
        assert ei.value.code == "quote_invalid"
        return store

    store = asyncio.run(run())
    assert store.get_valid("r1", 5.0) is None
    assert store.status["r1"].last_error == "quote_invalid: fake says no"


def test_unverified_route_refused_unless_policy_allows(calls: list[float]) -> None:
    async def run(allow: bool) -> Lease:
        store = LeaseStore(client=object())  # type: ignore[arg-type]
        r = SimpleNamespace(**{**vars(_route(allow_unverified=allow)), "evidence": "none"})
        return await store.ensure(r, 10.0)

    with pytest.raises(VerificationError) as ei:
        asyncio.run(run(False))
    assert ei.value.code == "upstream_unverified"
    lease = asyncio.run(run(True))
    assert lease.verified is False and lease.binding == "none"


def test_an_adapter_crash_fails_closed_as_a_verification_error(monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    async def crashing(client: object, route: SimpleNamespace, policy: object, now: float) -> Lease:
        return {"unexpected": "shape"}["missing"]  # a KeyError an adapter did not foresee

    monkeypatch.setitem(registry.ADAPTERS, "fake", crashing)

    async def run() -> VerificationError:
        store = LeaseStore(client=object())  # type: ignore[arg-type]
        try:
            await store.ensure(_route(), 1000.0)
        except VerificationError as e:
            return e
        raise AssertionError("a crashing adapter yielded a lease")

    err = asyncio.run(run())
    assert err.code == "evidence_malformed" and "KeyError" in err.reason
