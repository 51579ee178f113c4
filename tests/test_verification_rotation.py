"""Key rotation: a provider whose TLS key no longer matches the lease is re-verified once
and the call retried once; an impostor key (not attested) is refused with zero bytes sent."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import httpx
from aiohttp import web

from gateway.identity import keys
from gateway.identity.dstack_sim import SimulatorServer
from gateway.verification.lease import LeaseStore
from tests.test_gateway_fakes import MARKER, post_chat, write_config
from tests.test_verification_failclosed import Adversary, _routes, gateway


class RotatingProvider(Adversary):
    """An honest dstack provider that can change its TLS key while a lease is live."""

    def __init__(self) -> None:
        super().__init__("honest")
        self.attestations = 0

    async def _attest(self, request: web.Request) -> web.Response:
        self.attestations += 1
        return await super()._attest(request)

    async def _chat(self, request: web.Request) -> web.Response:
        resp = await super()._chat(request)
        resp.force_close()  # every call needs a new TLS handshake, as after a restart
        return resp

    def rotate(self, tmp: Path, *, attested: bool) -> str:
        """Serve a new TLS key from now on; `attested`: the attestation vouches for it too."""
        new = keys.keys_from_secrets(*(secrets.token_bytes(32) for _ in range(3)), "")
        d = tmp / f"rot-{secrets.token_hex(4)}"
        d.mkdir()
        (d / "c.pem").write_bytes(new.tls_cert_pem())
        (d / "k.pem").write_bytes(new.tls_key_pem())
        self.tls_ctx.load_cert_chain(d / "c.pem", d / "k.pem")  # new handshakes present it
        if attested:
            self.keyset = new
        return new.keyset.tls_spki_sha256


async def _receipt(url: str, r: httpx.Response) -> dict:
    async with httpx.AsyncClient() as c:
        got = await c.get(f"{url}/v1/receipts/{r.headers['x-receipt-id']}")
        return got.json()["receipt"]


def _run(tmp_path: Path, attested: bool) -> tuple[list[httpx.Response], list[dict], RotatingProvider,
                                                   str]:
    async def run() -> tuple[list[httpx.Response], list[dict], RotatingProvider, str]:
        sim = SimulatorServer(str(tmp_path / "dstack.sock"), tmp_path / "sim")
        await sim.start()
        prov = RotatingProvider()
        try:
            await prov.start(str(tmp_path / "dstack.sock"), tmp_path)
            cfg = write_config(tmp_path, "unused", routes=_routes(prov))
            async with gateway(cfg, LeaseStore()) as url:
                first = await post_chat(url)
                new_spki = prov.rotate(tmp_path, attested=attested)
                second = await post_chat(url)
                responses = [first, second]
                receipts = [await _receipt(url, r) for r in responses]
                return responses, receipts, prov, new_spki
        finally:
            await prov.stop()
            await sim.stop()

    return asyncio.run(run())


def test_rotated_attested_key_is_reverified_once_and_retried(tmp_path: Path) -> None:
    (first, second), (r1, r2), prov, new_spki = _run(tmp_path, attested=True)
    assert first.status_code == 200 and second.status_code == 200, second.text
    assert prov.attestations == 2  # the first lease, then exactly one re-verification
    assert len(prov.received) == 2  # one prompt per call: the refused handshake carried none
    assert r2["upstream"]["binding"] == f"tls-spki:{new_spki}"
    assert r2["upstream"]["lease_id"] != r1["upstream"]["lease_id"]
    assert r2["failed_attempts"] == ["adv:binding_mismatch"]


def test_key_swapped_mid_lease_without_attestation_is_refused(tmp_path: Path) -> None:
    (first, second), (_, r2), prov, _ = _run(tmp_path, attested=False)
    assert first.status_code == 200
    assert second.status_code == 502, second.text
    assert second.json()["error"]["code"] == "binding_mismatch"
    assert prov.attestations == 2  # re-verified once, not in a loop
    assert len(prov.received) == 1  # only the first call's prompt ever arrived
    assert MARKER not in second.text
    assert r2["refusal"]["code"] == "binding_mismatch"
    assert r2["forwarded_hash"] is None and r2["provider_response_hash"] is None
