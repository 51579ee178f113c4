"""Collateral fetched from a PCCS and cached: real dcap-qvl quotes verified through it.

The PCCS is a local server under test control serving the real collateral of
the dcap-qvl vector in Intel's PCS v4 wire shape; "now" comes from the
vectors, never the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.verification import collateral, tdx
from gateway.verification.base import Policy, VerificationError
from tests.pccs import Pccs


@pytest.fixture
def vec(testdata: Path) -> Path:
    d = testdata / "vectors" / "tdx"
    if not (d / "tdx_quote").exists():
        pytest.skip(f"TDX vectors absent under {d}")
    return d


@contextlib.asynccontextmanager
async def pccs(vec: Path) -> AsyncIterator[tuple[Pccs, str]]:
    """A running PCCS on a loopback port, and its URL."""
    server = Pccs([json.loads((vec / "tdx_quote_collateral.json").read_text())])
    await server.start()
    collateral._memory.clear()
    try:
        yield server, server.url
    finally:
        collateral._memory.clear()
        await server.stop()


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
