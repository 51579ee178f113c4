"""Fail closed: adversarial providers are refused and receive zero prompt bytes.

Each case runs the real gateway app with the real `gateway.verification`
lease store against a provider under test control that presents (or fails to
present) dstack evidence from a real guest-agent simulator. After the call,
the assertion is on what the provider recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from dstack_sdk import AsyncDstackClient

from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from gateway.identity.dstack_sim import SimulatorServer
from gateway.verification.base import Lease, VerificationError
from gateway.verification.lease import LeaseStore, RouteStatus
from tests.test_gateway_fakes import (
    ADMIN_KEY,
    MARKER,
    RecordingProvider,
    post_chat,
    run_gateway,
    tls_server_context,
    write_config,
)


class Adversary(RecordingProvider):
    """A provider that serves attestation and chat, recording every body it gets."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.docs: list[dict] = []
        self.http_port = self.tls_port = 0

    async def start(self, sock_path: str, tmp: Path) -> None:
        client = AsyncDstackClient(endpoint=sock_path)
        self.keyset = await keys.load(client, log_vkey="")
        self.client = client
        app = web.Application()
        app.router.add_get("/.well-known/attestation", self._attest)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.mode == "tls_key_swapped":
            ctx, _ = tls_server_context(tmp)  # a TLS key other than the attested one
        else:
            d = Path(tempfile.mkdtemp(dir=tmp))
            (d / "c.pem").write_bytes(self.keyset.tls_cert_pem())
            (d / "k.pem").write_bytes(self.keyset.tls_key_pem())
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(d / "c.pem", d / "k.pem")
        self.tls_ctx = ctx
        tls = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await tls.start()
        self.tls_port = tls._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _attest(self, request: web.Request) -> web.Response:
        nonce = request.query.get("nonce")
        if self.mode == "no_evidence":
            return web.Response(status=404)
        if self.mode == "malformed":
            return web.Response(body=b"{not json", content_type="application/json")
        if self.mode == "format_changed":
            return web.json_response({"attestation": {"tdx": "00"}, "version": 2})
        if self.mode == "replayed" and self.docs:
            return web.json_response(self.docs[0])  # a genuine document for another nonce
        doc = await identity_attestation.build(self.client, self.keyset,
                                      "stale-nonce" if self.mode == "replayed" else nonce)
        if self.mode == "keyset_not_bound":
            doc["keyset"] = dict(doc["keyset"], e2ee_public_key=doc["keyset"]["receipt_signing_key"])
        if self.mode == "bad_quote":
            q = bytearray(bytes.fromhex(doc["quote"]))
            q[600] ^= 1  # inside the TD report: report data no longer what was attested
            doc["quote"] = q.hex()
        self.docs.append(doc)
        return web.json_response(doc)


@contextlib.asynccontextmanager
async def gateway(cfg_path: Path, store: LeaseStore) -> AsyncIterator[str]:
    """The gateway over the real lease store (closed on exit); yields its URL."""
    try:
        async with run_gateway(cfg_path, store, VerificationError) as gw:
            yield gw.url
    finally:
        await store.close()


def _routes(adv: Adversary, *, https: bool = True, policy: str = "allow_simulated = true") -> str:
    base = (f"https://127.0.0.1:{adv.tls_port}/v1" if https
            else f"http://127.0.0.1:{adv.http_port}/v1")
    return f"""
[[routes]]
id = "adv"
model = "chat-model"
provider = "adversary"
base_url = "{base}"
attestation_url = "http://127.0.0.1:{adv.http_port}/.well-known/attestation"
upstream_model = "u"
evidence = "dstack"
[routes.policy]
{policy}
"""


CASES = [
    ("no_evidence", {}, "evidence_missing"),
    ("malformed", {}, "evidence_malformed"),
    ("format_changed", {}, "evidence_malformed"),
    ("bad_quote", {}, "quote_invalid"),
    ("keyset_not_bound", {}, "quote_invalid"),
    ("replayed", {}, "quote_invalid"),
    ("tls_key_swapped", {}, "binding_mismatch"),
    ("honest", {"policy": "allow_simulated = false"}, "simulated_not_allowed"),
    ("honest", {"policy": 'allow_simulated = true\nallowed_measurements = [{mr_td = "00"}]'},
     "measurement_mismatch"),
    ("honest", {"https": False}, "binding_mismatch"),
    ("honest", {"policy": 'allow_simulated = true\nkey_provider_id = "00"'},
     "measurement_mismatch"),
]


@pytest.mark.parametrize(("mode", "route_kw", "code"), CASES,
                         ids=[f"{m}-{c}" for m, _, c in CASES])
def test_refused_and_no_prompt_byte_moves(tmp_path, mode, route_kw, code):
    async def run() -> tuple[httpx.Response, Adversary]:
        sim = SimulatorServer(str(tmp_path / "dstack.sock"), tmp_path / "sim")
        await sim.start()
        adv = Adversary(mode)
        try:
            await adv.start(str(tmp_path / "dstack.sock"), tmp_path)
            if mode == "replayed":  # the adversary first captures a genuine document
                async with httpx.AsyncClient() as c:
                    await c.get(f"http://127.0.0.1:{adv.http_port}/.well-known/attestation",
                                params={"nonce": "captured"})
            cfg = write_config(tmp_path, "unused", routes=_routes(adv, **route_kw))
            async with gateway(cfg, LeaseStore()) as url:
                return await post_chat(url), adv
        finally:
            await adv.stop()
            await sim.stop()

    r, adv = asyncio.run(run())
    assert r.status_code in (502, 503), r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert "adv" in err["message"]  # the refused route is named
    assert adv.received == []  # not one byte of the prompt reached the provider
    assert MARKER not in r.text


def test_honest_provider_is_served_and_receipt_names_the_lease(tmp_path):
    async def run() -> tuple[httpx.Response, Adversary, dict]:
        sim = SimulatorServer(str(tmp_path / "dstack.sock"), tmp_path / "sim")
        await sim.start()
        adv = Adversary("honest")
        try:
            await adv.start(str(tmp_path / "dstack.sock"), tmp_path)
            cfg = write_config(tmp_path, "unused", routes=_routes(adv))
            async with gateway(cfg, LeaseStore()) as url:
                r = await post_chat(url)
                async with httpx.AsyncClient() as c:
                    rec = (await c.get(f"{url}/v1/receipts/{r.headers['x-receipt-id']}")).json()
                    view = (await c.get(f"{url}/v1/routes",
                                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()
                rec["view"] = view["routes"][0]
                return r, adv, rec
        finally:
            await adv.stop()
            await sim.stop()

    r, adv, rec = asyncio.run(run())
    assert r.status_code == 200, r.text
    assert len(adv.received) == 1 and MARKER.encode() in adv.received[0]
    up = rec["receipt"]["upstream"]
    assert up["verified"] is True and up["evidence"] == "dstack-simulated"
    assert up["binding"] == f"tls-spki:{adv.keyset.keyset.tls_spki_sha256}"
    view = rec["view"]
    assert view["state"] == "verified" and view["lease_id"] == up["lease_id"]
    assert view["facts"]["simulated"] is True and len(view["facts"]["compose_hash"]) == 64


def test_expired_lease_is_never_used(tmp_path):
    """A lease past expires_at is re-verified; if that fails, the call is refused."""
    class Route:
        id, provider, evidence = "r", "p", "dstack"
        base_url = "https://127.0.0.1:1/v1"
        attestation_url = "http://127.0.0.1:1/.well-known/attestation"  # nothing listens
        policy: dict[str, Any] = {"allow_simulated": True}

    async def run() -> None:
        store = LeaseStore()
        store.status["r"] = RouteStatus(lease=Lease("r", "p", "dstack", "d", "tls-spki:00",
                                                    verified_at=0, expires_at=100))
        assert store.get_valid("r", 99) is not None
        assert store.get_valid("r", 100) is None
        with pytest.raises(VerificationError) as e:
            await store.ensure(Route(), now=100)
        assert e.value.code == "evidence_missing"
        await store.close()

    asyncio.run(run())


def test_verify_routes_table_and_exit_code(tmp_path, capsys):
    from gateway.api import verify_routes

    async def start() -> tuple[SimulatorServer, Adversary, Adversary]:
        sim = SimulatorServer(str(tmp_path / "dstack.sock"), tmp_path / "sim")
        await sim.start()
        good, bad = Adversary("honest"), Adversary("no_evidence")
        await good.start(str(tmp_path / "dstack.sock"), tmp_path)
        await bad.start(str(tmp_path / "dstack.sock"), tmp_path)
        return sim, good, bad

    loop = asyncio.new_event_loop()
    sim, good, bad = loop.run_until_complete(start())
    import threading
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        routes = _routes(good) + _routes(bad).replace('id = "adv"', 'id = "broken"')
        cfg = write_config(tmp_path, "unused", routes=routes)
        rc = verify_routes.main(["--config", str(cfg)])
        out = capsys.readouterr().out
        assert rc == 1
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["ROUTE", "PROVIDER", "EVIDENCE", "RESULT"]
        row = {ln.split()[0]: ln for ln in lines[1:]}
        assert " ok " in row["adv"] and "tls-spki:" in row["adv"]
        assert " FAIL " in row["broken"] and "evidence_missing" in row["broken"]
    finally:
        for coro in (good.stop(), bad.stop(), sim.stop()):
            asyncio.run_coroutine_threadsafe(coro, loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_pinned_key_provider_is_accepted(tmp_path):
    async def run() -> httpx.Response:
        sim = SimulatorServer(str(tmp_path / "dstack.sock"), tmp_path / "sim")
        await sim.start()
        adv = Adversary("honest")
        try:
            await adv.start(str(tmp_path / "dstack.sock"), tmp_path)
            doc = await identity_attestation.build(adv.client, adv.keyset, "n")
            kms = doc["key_provider"]["id"]
            cfg = write_config(tmp_path, "unused", routes=_routes(
                adv, policy=f'allow_simulated = true\nkey_provider_id = "{kms.upper()}"'))
            async with gateway(cfg, LeaseStore()) as url:
                return await post_chat(url)
        finally:
            await adv.stop()
            await sim.stop()

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
