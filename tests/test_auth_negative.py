"""Every mutating or admin endpoint refuses a caller without the right credential (issue 17).

| endpoint | credential | refused with |
|---|---|---|
| log `POST /add`, `POST /add-batch` | the append token | 401 `unauthorized`, nothing appended |
| gateway `POST /v1/chat/completions`, `/v1/embeddings` | an API key | 401 `invalid_api_key`, no byte upstream, no receipt |
| gateway `GET /v1/routes` | the admin key (an API key is not one) | 401 `invalid_admin_key` |
| gateway `GET /v1/receipts/{id}` | the API key that made the call | 401 without a key, 404 for another key (tests/test_receipt_owner.py) |
| witness `POST /add-checkpoint` | the log's signature, for a configured origin | 404 `unknown_origin`, 403 `bad_signature`; nothing stored |

Each refusal is checked for its status and code and for leaving no trace: the
log's size, the provider's received bodies, the outbox and the witness's state
are unchanged.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import tlogutil
from tests.test_gateway_fakes import ADMIN_KEY, API_KEY, FakeProvider, gateway_stack, run_gateway
from tests.test_receipt_owner import OTHER_KEY, two_key_config
from tlog import checkpoint, merkle, note, tiles
from witness import request

WRONG_CREDENTIALS = [
    None,  # no Authorization header
    "",
    "Bearer",
    "Bearer wrong-token",
    "Basic dXNlcjpwYXNz",
]


def variants(secret: str) -> list[str | None]:
    """Wrong ways to send a credential, including near misses of the right one (RFC 7235
    lets the scheme be any case and be followed by several spaces: those are right ways)."""
    return [*WRONG_CREDENTIALS, secret, f"Bearer {secret}x", f"Bearer {secret[:-1]}", f"Token {secret}",
            f"Bearer {secret.upper()}"]


def auth(value: str | None) -> dict[str, str]:
    return {} if value is None else {"Authorization": value}


# -- the log ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    data = tmp_path_factory.mktemp("log") / "data"
    proc, url = tlogutil.start_tlog(data)
    try:
        yield url, (data / "append.token").read_text().strip()
    finally:
        tlogutil.stop(proc)


@pytest.mark.parametrize("path", ["/add", "/add-batch"])
def test_log_appends_need_the_append_token(log: tuple[str, str], path: str) -> None:
    url, token = log
    body = b"entry" if path == "/add" else tiles.encode_bundle([b"entry"])
    before = httpx.get(url + "/").json()["size"]
    for value in variants(token):
        r = httpx.post(url + path, content=body, headers=auth(value))
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), value
    assert httpx.get(url + "/").json()["size"] == before  # nothing was appended
    ok = httpx.post(url + path, content=body, headers=auth(f"Bearer {token}"))
    assert ok.status_code == 200  # the right token still works


# -- the gateway -----------------------------------------------------------------------

CALLS = {"/v1/chat/completions": b'{"model":"chat-model","messages":[{"role":"user",'
                                 b'"content":"hi"}]}',
         "/v1/embeddings": b'{"model":"embed-model","input":"hi"}'}


def test_model_calls_need_an_api_key(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path) as s:
            outbox = s.gw.app.svc.outbox
            for path, body in CALLS.items():
                for value in [*variants(API_KEY), f"Bearer {ADMIN_KEY}"]:
                    r = await s.client.post(s.url + path, content=body, headers=auth(value))
                    assert r.status_code == 401, (path, value)
                    assert r.json()["error"]["code"] == "invalid_api_key"
                    assert "x-receipt-id" not in r.headers
            assert s.prov.received == []  # no byte went upstream
            assert outbox.counts() == (0, 0)  # and no receipt was made
            r = await s.client.post(s.url + "/v1/chat/completions", content=CALLS[
                "/v1/chat/completions"], headers=auth(f"Bearer {API_KEY}"))
            assert r.status_code == 200 and len(s.prov.received) == 1
    asyncio.run(go())


def test_the_route_view_needs_the_admin_key(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path) as s:
            for value in [*variants(ADMIN_KEY), f"Bearer {API_KEY}"]:
                r = await s.client.get(s.url + "/v1/routes", headers=auth(value))
                assert r.status_code == 401, value
                assert r.json()["error"]["code"] == "invalid_admin_key"
            ok = await s.client.get(s.url + "/v1/routes", headers=auth(f"Bearer {ADMIN_KEY}"))
            assert ok.status_code == 200 and ok.json()["routes"]
    asyncio.run(go())


def test_a_receipt_is_not_shown_to_another_key_or_to_no_key(tmp_path: Path) -> None:
    """The owner check of tests/test_receipt_owner.py, with every wrong credential."""
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(two_key_config(tmp_path, prov.base_url)) as gw, \
                    httpx.AsyncClient() as c:
                r = await c.post(gw.url + "/v1/chat/completions",
                                 content=CALLS["/v1/chat/completions"],
                                 headers=auth(f"Bearer {API_KEY}"))
                url = f"{gw.url}/v1/receipts/{r.headers['x-receipt-id']}"
                for value in [*variants(API_KEY), f"Bearer {ADMIN_KEY}"]:
                    got = await c.get(url, headers=auth(value))
                    assert (got.status_code, got.json()["error"]["code"]) == (
                        401, "invalid_api_key"), value
                other = await c.get(url, headers=auth(f"Bearer {OTHER_KEY}"))
                assert (other.status_code, other.json()["error"]["code"]) == (
                    404, "receipt_not_found")
                assert (await c.get(url, headers=auth(f"Bearer {API_KEY}"))).status_code == 200
        finally:
            await prov.stop()
    asyncio.run(go())


# -- the witness -----------------------------------------------------------------------

LEAVES = [merkle.leaf_hash(b"a%d" % i) for i in range(4)]


def signed(signer: note.Ed25519Signer, origin: str | None = None) -> bytes:
    cp = checkpoint.Checkpoint(origin or signer.name, 4, merkle.root(LEAVES))
    return checkpoint.sign(cp, signer)


def test_the_witness_cosigns_only_configured_logs_under_their_keys(tmp_path: Path) -> None:
    log = note.generate_signer("example.com/log")
    port = tlogutil.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = tlogutil.start("witness", "serve", "--data", str(tmp_path / "w"), "--listen",
                          f"127.0.0.1:{port}", "--log", f"{log.name}={log.vkey}",
                          ready=url + "/healthz", stderr_path=tmp_path / "w.stderr")
    try:
        stranger = note.generate_signer("example.com/other-log")
        impostor = note.generate_signer("example.com/log")  # the configured name, another key
        # a stranger's note carrying the configured origin but signed by the stranger
        renamed = signed(stranger, origin=log.name)
        cases = [(signed(stranger), 404, "unknown_origin"),
                 (signed(impostor), 403, "bad_signature"),
                 (renamed, 403, "bad_signature")]
        for body, status, code in cases:
            r = httpx.post(url + "/add-checkpoint", content=request.format(0, [], body))
            assert (r.status_code, r.json()["code"]) == (status, code)
        # a valid log signature with the signature bytes flipped
        good = signed(log)
        text, sigs = note.split(good)
        sig = base64.b64encode(sigs[0].key_id + bytes(64)).decode()
        forged = text + f"\n\u2014 {log.name} {sig}\n".encode()
        r = httpx.post(url + "/add-checkpoint", content=request.format(0, [], forged))
        assert (r.status_code, r.json()["code"]) == (403, "bad_signature")
        status = httpx.get(url + "/").json()
        assert status["logs"] == [{"origin": log.name, "vkey": log.vkey, "size": 0,
                                   "root": None}]  # nothing was stored
        ok = httpx.post(url + "/add-checkpoint", content=request.format(0, [], good))
        assert ok.status_code == 200
    finally:
        tlogutil.stop(proc)
