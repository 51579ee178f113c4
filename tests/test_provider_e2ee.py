"""Provider E2EE: a route whose provider attests an E2EE key gets every request sealed
to it (aci-1), not sent in clear; the demo provider opens it and seals its answer back.
A recorder between gateway and provider sees no prompt and no completion."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.demo import provider
from tests.mitm import Mitm
from tests.test_gateway_fakes import API_KEY, FakeLeaseStore, run_gateway, write_config
from verifier import aci, receipt, sse

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "provider-side secret RED-KITE-5512"


@dataclass
class KeyedLease:
    """A verified lease whose evidence attested an E2EE key (as the dstack adapter's do)."""

    lease_id: str
    binding: str
    facts: dict[str, Any] = field(default_factory=dict)
    verified: bool = True
    evidence: str = "dstack"
    verified_at: float = field(default_factory=time.time)
    expires_at: float = field(default_factory=lambda: time.time() + 300)


def routes(base: str) -> str:
    return f"""
[[routes]]
id = "sealed"
model = "chat-model"
provider = "demo"
base_url = "{base}"
upstream_model = "demo-chat-1"
evidence = "dstack"
e2ee = true
policy = {{ allow_any_workload = true }}

[[routes]]
id = "sealed-embed"
model = "embed-model"
provider = "demo"
base_url = "{base}"
upstream_model = "demo-embed-1"
kind = "embeddings"
evidence = "dstack"
e2ee = true
policy = {{ allow_any_workload = true }}
"""


async def start_provider(key: bytes) -> tuple[web.AppRunner, str]:
    async def attest(nonce: str | None) -> dict[str, Any]:
        raise AssertionError("the fake lease store does not fetch evidence")

    runner = web.AppRunner(provider.make_app(attest, key), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def secrets_in(data: bytes, words: list[str]) -> list[str]:
    return [w for w in words if w.encode() in data]


@pytest.mark.parametrize("client_e2ee", [False, True], ids=["plain-client", "sealed-client"])
def test_requests_are_sealed_to_the_provider(tmp_path: Path, client_e2ee: bool) -> None:
    key = X25519PrivateKey.generate().private_bytes_raw()
    store = FakeLeaseStore()
    binding = "e2ee-key:" + base64.b64encode(aci.public_key(key)).decode()
    for rid in ("sealed", "sealed-embed"):
        store.outcomes[rid] = KeyedLease(f"lease-{rid}", binding,  # type: ignore[assignment]
                                         {"e2ee_public_key": base64.b64encode(
                                             aci.public_key(key)).decode()})

    async def go() -> None:
        runner, url = await start_provider(key)
        tap = Mitm(url)
        try:
            cfg = write_config(tmp_path, "http://unused", routes=routes(tap.url + "/v1"))
            async with run_gateway(cfg, store) as gw, httpx.AsyncClient(timeout=30) as c:
                gpub = gw.e2ee_key.public_key().public_bytes_raw()
                answers: list[str] = []
                for body in ({"model": "chat-model",
                              "messages": [{"role": "user", "content": PROMPT}]},
                             {"model": "chat-model", "stream": True,
                              "messages": [{"role": "user", "content": PROMPT}]},
                             {"model": "embed-model", "input": PROMPT}):
                    kind = "embeddings" if "input" in body else "chat"
                    path = "/v1/embeddings" if kind == "embeddings" else "/v1/chat/completions"
                    headers, opener = dict(AUTH), None
                    if client_e2ee:
                        body, h, opener = aci.seal_request(body, kind, gpub, now=time.time())
                        headers.update(h)
                    r = await c.post(gw.url + path, json=body, headers=headers)
                    assert r.status_code == 200, r.text
                    answers.append(read_answer(r, opener))
                    rec = (await c.get(f"{gw.url}/v1/receipts/{r.headers['x-receipt-id']}",
                                       headers=AUTH)).json()["receipt"]
                    assert rec["upstream"]["binding"] == binding
                    assert rec["upstream"]["e2ee"] == {
                        "mode": "aci-1", "key": base64.b64encode(aci.public_key(key)).decode()}
                    salt = bytes.fromhex(r.headers["x-receipt-salt"])
                    sent = tap.exchanges[-1]
                    assert rec["provider_request_hash"] == receipt.digest(salt,
                                                                          sent.request_body)
                    assert rec["provider_response_hash"] == receipt.digest(salt,
                                                                           sent.response_body)
                    assert rec["forwarded_hash"] != rec["provider_request_hash"]
                    assert rec["response_hash"] == receipt.digest(salt, r.content)
                assert answers[0].startswith("[demo ") and answers[1].startswith("[demo ")
                assert len(json.loads(answers[2])) == 32
                wire = b"".join(e.request_body + e.response_body for e in tap.exchanges)
                assert secrets_in(wire, [PROMPT, "RED-KITE", answers[0], answers[1][:30],
                                         json.dumps(json.loads(answers[2])[:2])[1:-1]]) == []
                assert all(e.request_headers["x-e2ee-version"] == "aci-1"
                           for e in tap.exchanges)
        finally:
            tap.close()
            await runner.cleanup()
    asyncio.run(go())


def read_answer(r: httpx.Response, opener: Any) -> str:
    """The completion text (or the embedding as JSON) of a gateway answer."""
    if opener is not None:
        opener.start(r.headers)
    if r.headers["content-type"].startswith("text/event-stream"):
        p, text = sse.SseParser(), ""
        for ev in p.feed(r.content):
            if ev.data != b"[DONE]":
                chunk = json.loads(ev.data)
                chunk = opener.open_response(chunk) if opener else chunk
                text += "".join(ch["delta"].get("content") or "" for ch in chunk["choices"])
        return text
    obj = r.json()
    obj = opener.open_response(obj) if opener else obj
    if "data" in obj:
        return json.dumps(obj["data"][0]["embedding"])
    return obj["choices"][0]["message"]["content"]


def test_a_route_whose_provider_attests_no_e2ee_key_sends_nothing(tmp_path: Path) -> None:
    store = FakeLeaseStore()
    store.outcomes["sealed"] = KeyedLease("l1", "e2ee-key:unknown")  # type: ignore[assignment]

    async def go() -> None:
        runner, url = await start_provider(X25519PrivateKey.generate().private_bytes_raw())
        tap = Mitm(url)
        try:
            cfg = write_config(tmp_path, "http://unused", routes=routes(tap.url + "/v1"))
            async with run_gateway(cfg, store) as gw, httpx.AsyncClient(timeout=30) as c:
                r = await c.post(gw.url + "/v1/chat/completions", headers=AUTH, json={
                    "model": "chat-model", "messages": [{"role": "user", "content": PROMPT}]})
                assert (r.status_code, r.json()["error"]["code"]) == (502, "binding_mismatch")
                assert tap.exchanges == []
        finally:
            tap.close()
            await runner.cleanup()
    asyncio.run(go())


def test_an_unsealed_provider_answer_is_withheld(tmp_path: Path) -> None:
    """A provider (or anyone on its path) answering in clear on a sealed route."""
    key = X25519PrivateKey.generate().private_bytes_raw()
    store = FakeLeaseStore()
    store.outcomes["sealed"] = KeyedLease(  # type: ignore[assignment]
        "l1", "e2ee-key:x", {"e2ee_public_key": base64.b64encode(aci.public_key(key)).decode()})

    async def go() -> None:
        runner, url = await start_provider(key)
        tap = Mitm(url)

        def strip(ex: Any) -> None:
            ex.response_headers.pop("x-e2ee-enc", None)
        tap.on_response = strip
        try:
            cfg = write_config(tmp_path, "http://unused", routes=routes(tap.url + "/v1"))
            async with run_gateway(cfg, store) as gw, httpx.AsyncClient(timeout=30) as c:
                for stream in (False, True):
                    r = await c.post(gw.url + "/v1/chat/completions", headers=AUTH, json={
                        "model": "chat-model", "stream": stream,
                        "messages": [{"role": "user", "content": PROMPT}]})
                    assert r.status_code == 502
                    assert r.json()["error"]["code"] == "upstream_e2ee_invalid"
        finally:
            tap.close()
            await runner.cleanup()
    asyncio.run(go())
