"""Collateral fetched from a PCCS and cached: real dcap-qvl quotes verified through it.

The PCCS is a local server under test control serving the real collateral of
the dcap-qvl vector in Intel's PCS v4 wire shape; "now" comes from the
vectors, never the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.verification import collateral, tdx
from gateway.verification.base import Policy, VerificationError


@pytest.fixture
def vec(testdata: Path) -> Path:
    d = testdata / "vectors" / "tdx"
    if not (d / "tdx_quote").exists():
        pytest.skip(f"TDX vectors absent under {d}")
    return d


class Pccs:
    """Serves one QuoteCollateralV3 as a PCCS would; counts requests; can go down."""

    def __init__(self, col: dict[str, str]) -> None:
        self.col = col
        self.requests: list[str] = []
        self.down = False

    async def handle(self, req: web.Request) -> web.Response:
        self.requests.append(req.path)
        d, q = self.col, urllib.parse.quote
        if self.down:
            return web.Response(status=503)
        if req.path.endswith("/pckcrl"):
            return web.Response(body=bytes.fromhex(d["pck_crl"]),
                                headers={"SGX-PCK-CRL-Issuer-Chain": q(d["pck_crl_issuer_chain"])})
        if req.path.endswith("/tcb"):
            return web.Response(
                text='{"tcbInfo":' + d["tcb_info"] + ',"signature":"' + d["tcb_info_signature"] + '"}',
                content_type="application/json",
                headers={"TCB-Info-Issuer-Chain": q(d["tcb_info_issuer_chain"])})
        if req.path.endswith("/qe/identity"):
            return web.Response(
                text='{"enclaveIdentity":' + d["qe_identity"] + ',"signature":"'
                + d["qe_identity_signature"] + '"}', content_type="application/json",
                headers={"SGX-Enclave-Identity-Issuer-Chain": q(d["qe_identity_issuer_chain"])})
        if req.path.endswith("/rootcacrl"):
            return web.Response(text=d["root_ca_crl"])
        return web.Response(status=404)


@contextlib.asynccontextmanager
async def pccs(vec: Path) -> AsyncIterator[tuple[Pccs, str]]:
    """A running PCCS on a loopback port, and its URL."""
    server = Pccs(json.loads((vec / "tdx_quote_collateral.json").read_text()))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    collateral._memory.clear()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        collateral._memory.clear()
        await runner.cleanup()


def _times(vec: Path) -> tuple[float, float]:
    e = json.loads((vec / "expected.json").read_text())["quotes"]["tdx_quote"]
    return e["verify_at"], e["valid_window"]["not_after"]


def test_fetched_then_cached_in_memory_and_on_disk(vec: Path, tmp_path: Path) -> None:
    asyncio.run(_fetched_then_cached(vec, tmp_path))


async def _fetched_then_cached(vec: Path, tmp_path: Path) -> None:
    async with pccs(vec) as (server, url):
        raw = (vec / "tdx_quote").read_bytes()
        at, _ = _times(vec)
        pol = Policy(pccs_url=url, collateral_cache_dir=str(tmp_path / "cache"))
        first = await tdx.verify_quote(raw, pol, at)
        assert first.tcb_status == "UpToDate" and not first.simulated
        fetched = len(server.requests)
        assert fetched >= 3  # PCK CRL, TCB info, QE identity (and the root CA CRL)
        await asyncio.gather(*(tdx.verify_quote(raw, pol, at) for _ in range(4)))
        assert len(server.requests) == fetched  # served from memory
        assert len(list((tmp_path / "cache").glob("*.json"))) == 1
        collateral._memory.clear()  # a restarted gateway: the disk copy is enough
        server.down = True
        again = await tdx.verify_quote(raw, pol, at)
        assert again.tcb_status == "UpToDate"


def test_stale_cache_used_when_pccs_down_and_expiry_enforced(
        vec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collateral, "CACHE_SECONDS", 3600.0)
    asyncio.run(_stale_cache(vec, tmp_path, monkeypatch))


async def _stale_cache(vec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with pccs(vec) as (server, url):
        raw = (vec / "tdx_quote").read_bytes()
        at, not_after = _times(vec)
        pol = Policy(pccs_url=url, collateral_cache_dir=str(tmp_path))
        await tdx.verify_quote(raw, pol, at)
        monkeypatch.setattr(collateral, "CACHE_SECONDS", 0.0)  # every use wants a refresh
        server.down = True
        assert (await tdx.verify_quote(raw, pol, at)).tcb_status == "UpToDate"
        with pytest.raises(VerificationError) as ei:
            await tdx.verify_quote(raw, pol, not_after + 86400)
        assert ei.value.code == "evidence_expired"


def test_pccs_down_without_cache_fails_closed(vec: Path) -> None:
    asyncio.run(_down_no_cache(vec))


async def _down_no_cache(vec: Path) -> None:
    async with pccs(vec) as (server, url):
        server.down = True
        with pytest.raises(VerificationError) as ei:
            await tdx.verify_quote((vec / "tdx_quote").read_bytes(), Policy(pccs_url=url), _times(vec)[0])
        assert ei.value.code == "evidence_missing"


def test_no_collateral_source_refuses_real_quote(vec: Path) -> None:
    with pytest.raises(VerificationError) as ei:
        asyncio.run(tdx.verify_quote((vec / "tdx_quote").read_bytes(), Policy(), _times(vec)[0]))
    assert ei.value.code == "quote_invalid"
