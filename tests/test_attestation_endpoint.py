"""`GET /.well-known/attestation` cannot be used to exhaust the TEE: the nonce-less document
is cached, and requests with a nonce are rate-limited per client and overall."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.attestation import AttestationDocuments
from gateway.api.errors import GatewayError
from tests.test_gateway_fakes import FakeProvider, run_gateway, write_config


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class CountingTee:
    def __init__(self) -> None:
        self.nonces: list[str | None] = []

    async def __call__(self, nonce: str | None) -> dict[str, Any]:
        self.nonces.append(nonce)
        await asyncio.sleep(0.01)  # a quote takes a while: concurrent callers overlap
        return {"nonce": nonce, "n": len(self.nonces)}


def test_nonce_less_document_is_made_once_per_ttl() -> None:
    async def go() -> None:
        tee, clock = CountingTee(), Clock()
        docs = AttestationDocuments(tee, ttl=60, per_client_per_minute=5, global_per_second=5,
                                    clock=clock)
        got = await asyncio.gather(*[docs.document(None, f"10.0.0.{i}") for i in range(50)])
        assert tee.nonces == [None] and all(d == got[0] for d in got)
        clock.t += 59
        await docs.document(None, "x")
        assert len(tee.nonces) == 1
        clock.t += 2
        assert (await docs.document(None, "x"))["n"] == 2
    asyncio.run(go())


def test_nonce_requests_are_limited_per_client_and_overall() -> None:
    async def go() -> None:
        tee, clock = CountingTee(), Clock()
        docs = AttestationDocuments(tee, ttl=60, per_client_per_minute=3, global_per_second=5,
                                    clock=clock)
        for i in range(3):
            await docs.document(f"n{i}", "a")
        with pytest.raises(GatewayError) as e:
            await docs.document("n3", "a")
        assert (e.value.status, e.value.code) == (429, "rate_limit_exceeded")
        await docs.document("b0", "b")
        await docs.document("b1", "b")
        with pytest.raises(GatewayError):  # 5 quotes this second across all clients
            await docs.document("c0", "c")
        clock.t += 1.0
        await docs.document("c0", "c")  # the global bucket refills; c kept its token
        clock.t += 20.0  # a minute's third: one more for "a"
        await docs.document("n4", "a")
        assert len(tee.nonces) == 7
    asyncio.run(go())


def test_endpoint_caches_and_limits(tmp_path: Path) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, extra_gateway=(
                "attestation_nonce_per_client_per_minute = 4\n"
                "attestation_nonce_per_second = 100"))
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                url = gw.url + "/.well-known/attestation"
                docs = gw.app.attestations
                plain = [await c.get(url) for _ in range(20)]
                assert {r.status_code for r in plain} == {200} and docs.quotes == 1
                nonced = [await c.get(url, params={"nonce": f"{i:02x}"}) for i in range(6)]
                assert [r.status_code for r in nonced] == [200] * 4 + [429] * 2
                assert nonced[-1].json()["error"]["code"] == "rate_limit_exceeded"
                assert nonced[0].json()["nonce"] == "00"
                assert docs.quotes == 5  # nothing was made for the refused ones
                assert (await c.get(url)).status_code == 200  # the shared one still answers
        finally:
            await prov.stop()
    asyncio.run(go())


def test_limits_are_positive_in_config(tmp_path: Path) -> None:
    from gateway.api import config
    (tmp_path / "g.toml").write_text("[gateway]\nattestation_nonce_per_second = 0\n")
    with pytest.raises(config.ConfigError, match="must be positive"):
        config.load(tmp_path / "g.toml")
