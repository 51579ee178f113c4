"""The public log tells a guesser nothing: with every log entry and tile, every tlog endpoint
and every unauthenticated gateway endpoint, a guesser who knows the exact prompt (plain or
sealed with ACI E2EE) still cannot confirm it; two identical calls have unrelated digests;
a client-chosen salt is honoured; and the caller, holding the salt, verifies every digest
against the exact bytes it sent and received and the provider exchanged.

One scenario (a real `tlog serve`, the gateway with its shipper, a provider recording its
bytes) runs once for the module; each test checks one promise on what it recorded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tests.test_gateway_fakes import API_KEY, FakeProvider, LogRef, run_gateway, write_config
from tests.tlogutil import start_tlog, stop
from tlog import tiles
from verifier import aci, receipt

SECRET = "I tested positive for HIV on 3 March; should I tell my employer?"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHOSEN_SALT = bytes(range(32))


@dataclass
class Exchange:
    """One call as the caller and the provider saw it."""

    name: str
    request: bytes  # what the client sent
    response: bytes  # what the client received (the whole stream for a stream)
    salt: bytes
    headers: dict[str, str]
    receipt: dict[str, Any] = field(default_factory=dict)
    forwarded: bytes | None = None  # what the provider received
    provider_sent: bytes | None = None  # what the provider answered
    plaintext: dict[str, Any] | None = None  # the request before sealing (E2EE)


@dataclass
class Scenario:
    calls: dict[str, Exchange]
    public: bytes  # everything a guesser can read without credentials
    entries: list[bytes]


def chat_obj(stream: bool = False) -> dict[str, Any]:
    return {"model": "chat-model", "stream": stream,
            "messages": [{"role": "user", "content": SECRET}]}


async def _post(c: httpx.AsyncClient, url: str, path: str, body: bytes,
                headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
    async with c.stream("POST", url + path, content=body, headers={**AUTH, **headers}) as r:
        return r, b"".join([x async for x in r.aiter_raw()])


async def _calls(c: httpx.AsyncClient, url: str, gw: Any, prov: FakeProvider
                 ) -> dict[str, Exchange]:
    out: dict[str, Exchange] = {}

    async def call(name: str, path: str, body: bytes, headers: dict[str, str] | None = None,
                   plaintext: dict[str, Any] | None = None, upstream: bool = True) -> None:
        n = len(prov.received)
        r, raw = await _post(c, url, path, body, headers or {})
        assert r.status_code == (200 if upstream else 404), raw[:200]
        ex = Exchange(name, body, raw, bytes.fromhex(r.headers["x-receipt-salt"]),
                      dict(r.headers), plaintext=plaintext)
        if upstream:
            assert len(prov.received) == n + 1
            ex.forwarded, ex.provider_sent = prov.received[-1], prov.sent[-1]
        out[name] = ex

    plain = json.dumps(chat_obj()).encode()
    await call("plain", "/v1/chat/completions", plain)
    await call("again", "/v1/chat/completions", plain)  # the very same bytes
    await call("stream", "/v1/chat/completions", json.dumps(chat_obj(True)).encode())
    await call("embed", "/v1/embeddings",
               json.dumps({"model": "embed-model", "input": SECRET}).encode())
    await call("chosen", "/v1/chat/completions", plain, {"x-receipt-salt": CHOSEN_SALT.hex()})
    await call("refused", "/v1/chat/completions", plain.replace(b"chat-model", b"no-such"),
               upstream=False)
    gpub = gw.e2ee_key.public_key().public_bytes_raw()
    for name, stream in (("e2ee", False), ("e2ee_stream", True)):
        sealed, headers, _ = aci.seal_request(chat_obj(stream), "chat", gpub, now=time.time())
        body = json.dumps(sealed).encode()
        assert SECRET.encode() not in body
        await call(name, "/v1/chat/completions", body, headers, chat_obj(stream))
    for ex in out.values():  # wait until the shipper logged every receipt
        for _ in range(1000):
            got = (await c.get(f"{url}/v1/receipts/{ex.headers['x-receipt-id']}",
                               headers=AUTH)).json()
            if got["proof"] is not None:
                break
            await asyncio.sleep(0.01)
        assert got["proof"] is not None, ex.name
        ex.receipt = got["receipt"]
    return out


async def _public_view(c: httpx.AsyncClient, gw_url: str, log_url: str
                       ) -> tuple[bytes, list[bytes]]:
    """Everything readable without a credential: the whole log and every open endpoint."""
    seen: list[bytes] = []

    async def get(url: str, **kw: Any) -> bytes:
        r = await c.get(url, **kw)
        seen.append(r.content)
        return r.content

    cp = await get(log_url + "/checkpoint")
    size = int(cp.split(b"\n")[1])
    entries: list[bytes] = []
    for t in tiles.bundles_for_size(size):
        entries += tiles.decode_bundle(await get(f"{log_url}/{t}"))
    for t in tiles.tiles_for_size(size):
        await get(f"{log_url}/{t}")
    await get(f"{log_url}/consistency", params={"old": 1, "new": size})
    hashes = {json.loads(e).get("request_hash") for e in entries} - {None}
    ids = {json.loads(e).get("id") for e in entries} - {None}
    for h in hashes:
        await get(f"{log_url}/proof/{h}")
        await get(f"{gw_url}/v1/receipts/by-request-hash/{h}")
    for rid in ids:
        await get(f"{gw_url}/v1/receipts/{rid}")  # no key: 401
    for path in ("/v1/models", "/.well-known/attestation", "/healthz", "/v1/routes"):
        await get(gw_url + path)
    await get(gw_url + "/.well-known/attestation", params={"nonce": "00ff"})
    return b"\n".join(seen), entries


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("privacy")
    proc, log_url = start_tlog(tmp / "tlog")
    try:
        ref = LogRef(log_url, (tmp / "tlog" / "append.token").read_text().strip(),
                     (tmp / "tlog" / "log.vkey").read_text().strip())

        async def go() -> Scenario:
            prov = FakeProvider()
            await prov.start()
            try:
                cfg = write_config(tmp, prov.base_url, log=ref)
                async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=30) as c:
                    calls = await _calls(c, gw.url, gw, prov)
                    public, entries = await _public_view(c, gw.url, log_url)
                return Scenario(calls, public, entries)
            finally:
                await prov.stop()
        return asyncio.run(go())
    finally:
        stop(proc)


# -- what a guesser might try ---------------------------------------------------------

def serialisations(obj: dict[str, Any]) -> list[bytes]:
    """The ways a guesser might write a request it guessed: key orders, spacing, the
    forwarded form (upstream model, usage asked for a stream)."""
    forms = [obj, {**obj, "model": "upstream-chat-1"}, {**obj, "model": "upstream-embed"}]
    if obj.get("stream"):
        forms.append({**obj, "model": "upstream-chat-1",
                      "stream_options": {"include_usage": True}})
    out: list[bytes] = []
    for form in forms:
        for keys in itertools.permutations(form):
            ordered = {k: form[k] for k in keys}
            out += [json.dumps(ordered).encode(), orjson.dumps(ordered),
                    json.dumps(ordered, separators=(",", ":")).encode(),
                    json.dumps(ordered, indent=2).encode()]
    return out


def confirmations(data: bytes, keys: list[bytes]) -> list[bytes]:
    """Digests of `data` a guesser could look for: plain hashes, and HMACs under every key
    the guesser could know."""
    out = [hashlib.sha256(data).hexdigest().encode(), hashlib.sha256(data).digest(),
           base64.b64encode(hashlib.sha256(data).digest())]
    out += [hmac.new(k, data, hashlib.sha256).hexdigest().encode() for k in keys]
    return out


def guesser_keys(s: Scenario) -> list[bytes]:
    """Keys a guesser could try as the salt: empty, zeros, and every id and hash it saw."""
    keys = [b"", bytes(32)]
    for e in s.entries:
        obj = json.loads(e)
        for v in (obj.get("id"), obj.get("request_hash"), obj.get("time")):
            if isinstance(v, str):
                keys += [v.encode(), bytes.fromhex(v) if len(v) == 64 else v.encode()]
    return keys


# -- the promises -----------------------------------------------------------------------

def test_no_salt_and_no_content_is_public(scenario: Scenario) -> None:
    public = scenario.public
    assert SECRET.encode() not in public
    assert b"COMPLETION-MARKER" not in public
    for ex in scenario.calls.values():
        assert ex.salt.hex().encode() not in public, ex.name
        assert base64.b64encode(ex.salt) not in public, ex.name


@pytest.mark.parametrize("name", ["plain", "stream", "embed", "refused", "e2ee", "e2ee_stream"])
def test_a_guesser_cannot_confirm_the_right_guess(scenario: Scenario, name: str) -> None:
    ex = scenario.calls[name]
    obj = ex.plaintext or json.loads(ex.request)
    guesses = serialisations(obj) + [ex.request, ex.response]
    guesses += [g for g in (ex.forwarded, ex.provider_sent) if g is not None]
    keys = guesser_keys(scenario)
    for guess in guesses:
        for digest in confirmations(guess, keys):
            assert digest not in scenario.public, (name, guess[:80])
    # the right answer, under the caller's salt, is in the log: only the salt confirms it
    assert receipt.digest(ex.salt, ex.request).encode() in scenario.public


def test_identical_calls_have_unrelated_digests(scenario: Scenario) -> None:
    a, b = scenario.calls["plain"], scenario.calls["again"]
    assert a.request == b.request and a.forwarded == b.forwarded
    assert a.salt != b.salt
    for member in receipt.DIGEST_FIELDS:
        assert a.receipt[member] != b.receipt[member], member
    assert a.headers["x-request-hash"] != b.headers["x-request-hash"]


def test_a_client_chosen_salt_is_honoured(scenario: Scenario) -> None:
    ex = scenario.calls["chosen"]
    assert ex.salt == CHOSEN_SALT
    assert ex.headers["x-request-hash"] == receipt.digest(CHOSEN_SALT, ex.request)
    receipt.check_digest(ex.receipt, "response_hash", CHOSEN_SALT, ex.response)


@pytest.mark.parametrize("name", ["plain", "stream", "embed", "chosen", "e2ee", "e2ee_stream"])
def test_the_caller_with_the_salt_verifies_every_digest(scenario: Scenario, name: str) -> None:
    ex = scenario.calls[name]
    rc = ex.receipt
    assert ex.forwarded is not None and ex.provider_sent is not None
    receipt.check_digest(rc, "request_hash", ex.salt, ex.request)
    receipt.check_digest(rc, "forwarded_hash", ex.salt, ex.forwarded)
    receipt.check_digest(rc, "provider_request_hash", ex.salt, ex.forwarded)
    receipt.check_digest(rc, "provider_response_hash", ex.salt, ex.provider_sent)
    receipt.check_digest(rc, "response_hash", ex.salt, ex.response)
    assert rc["request_hash"] == ex.headers["x-request-hash"]
    with pytest.raises(receipt.ReceiptError):
        receipt.check_digest(rc, "response_hash", ex.salt, ex.response + b" ")
    with pytest.raises(receipt.ReceiptError):
        receipt.check_digest(rc, "request_hash", bytes(32), ex.request)


def test_a_refused_call_forwarded_nothing_and_its_digests_still_verify(scenario: Scenario
                                                                      ) -> None:
    ex = scenario.calls["refused"]
    rc = ex.receipt
    assert rc["forwarded_hash"] is None and rc["provider_request_hash"] is None
    receipt.check_digest(rc, "request_hash", ex.salt, ex.request)
    receipt.check_digest(rc, "response_hash", ex.salt, ex.response)
