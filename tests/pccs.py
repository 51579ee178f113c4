"""A PCCS on a loopback port: recorded Intel collateral served in PCS v4 wire shape."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from aiohttp import web


class Pccs:
    """Serves QuoteCollateralV3 documents per platform (FMSPC); counts requests; can go down.

    CRLs, QE identity and issuer chains come from the first collateral (they are
    Intel-wide); TCB info is chosen by the `fmspc` query parameter.
    """

    def __init__(self, collaterals: list[dict[str, Any]]) -> None:
        self.by_fmspc = {json.loads(c["tcb_info"])["fmspc"].lower(): c for c in collaterals}
        self.any = collaterals[0]
        self.requests: list[str] = []
        self.down = False
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, req: web.Request) -> web.Response:
        self.requests.append(req.path)
        if self.down:
            return web.Response(status=503)
        q = urllib.parse.quote
        if req.path.endswith("/tcb"):
            d = self.by_fmspc.get(req.query.get("fmspc", "").lower())
            if d is None:
                return web.Response(status=404)
            return web.Response(
                text='{"tcbInfo":' + d["tcb_info"] + ',"signature":"' + d["tcb_info_signature"] + '"}',
                content_type="application/json",
                headers={"TCB-Info-Issuer-Chain": q(d["tcb_info_issuer_chain"])})
        d = self.any
        if req.path.endswith("/pckcrl"):
            return web.Response(body=bytes.fromhex(d["pck_crl"]),
                                headers={"SGX-PCK-CRL-Issuer-Chain": q(d["pck_crl_issuer_chain"])})
        if req.path.endswith("/qe/identity"):
            return web.Response(
                text='{"enclaveIdentity":' + d["qe_identity"] + ',"signature":"'
                + d["qe_identity_signature"] + '"}', content_type="application/json",
                headers={"SGX-Enclave-Identity-Issuer-Chain": q(d["qe_identity_issuer_chain"])})
        if req.path.endswith("/rootcacrl"):
            return web.Response(text=d["root_ca_crl"])
        return web.Response(status=404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
