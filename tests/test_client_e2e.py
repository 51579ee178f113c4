"""The verifying client with the stock `openai` SDK through `python -m gateway demo`.

Both flows of docs/client.md, each with a recorder on the wire: ACI E2EE over plain
HTTP through a man in the middle that sees (and, in the attack tests, rewrites)
every exchange, and attested TLS through a TCP relay that keeps every byte. Neither
the wire, nor the log, holds the prompt or the completion; every attack is caught.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.demo.stack import GATEWAY_APP_ID
from tests.mitm import Exchange, Mitm, TcpRecorder
from tests.test_demo import Demo
from tests.test_gateway_fakes import tls_server_context
from tlog import tiles
from verifier import aci
from verifier import client as vc

PROMPT = "Tell me the secret plan, codename BLUE-HERON-4471."
EMBED_INPUT = "embedding input GREEN-FINCH-9023"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("client") / "demo")
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture(scope="module")
def policy(stack: Demo) -> vc.Policy:
    return vc.Policy(allow_simulated=True, app_id=GATEWAY_APP_ID,
                     log_vkey=stack.ready["log_vkey"], witness_vkeys=(stack.ready["witness_vkey"],),
                     quorum=1, require_logged_release=True)


@pytest.fixture
def mitm(stack: Demo) -> Iterator[Mitm]:
    m = Mitm(stack.ready["gateway"])
    yield m
    m.close()


def sdk(gw: vc.Gateway, stack: Demo, e2ee: bool, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=stack.ready["api_key"],
                         http_client=gw.http_client(e2ee=e2ee, **kw), max_retries=0)


def round_trips(c: openai.OpenAI, gw: vc.Gateway) -> list[str]:
    """Chat, streamed chat, embeddings as base64 (the SDK's default) and as floats; the
    completions and vectors the SDK returned (to look for on the wire)."""
    seen: list[str] = []
    out = c.chat.completions.create(model="demo-chat",
                                    messages=[{"role": "user", "content": PROMPT}])
    text = out.choices[0].message.content or ""
    assert text.startswith("[demo ")
    seen.append(text)
    assert gw.last_receipt is not None and gw.last_receipt["route"]["model"] == "demo-chat"
    stream = c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": PROMPT + " (stream)"}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed.startswith("[demo ") and chunks[-1].usage is not None
    seen.append(streamed)
    assert gw.last_receipt["usage"]["total_tokens"] == chunks[-1].usage.total_tokens
    b64 = c.embeddings.create(model="demo-embed", input=[EMBED_INPUT, "second"])
    floats = c.embeddings.create(model="demo-embed", input=EMBED_INPUT,
                                 encoding_format="float")
    assert len(b64.data) == 2 and len(b64.data[0].embedding) == 32
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    vec = b64.data[0].embedding  # as the provider encoded it, in both formats
    seen += [json.dumps(floats.data[0].embedding[:2])[1:-1],
             base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()[:24]]
    return seen


def log_entries(stack: Demo) -> list[bytes]:
    """Every entry of the demo's log, read the way any outsider reads it (tiles)."""
    base = stack.ready["tlog"]
    size = int(httpx.get(base + "/checkpoint", timeout=10).text.split("\n")[1])
    out: list[bytes] = []
    for b in tiles.bundles_for_size(size):
        out += tiles.decode_bundle(httpx.get(f"{base}/{b}", timeout=10).content)
    return out


def wait_logged(gw: vc.Gateway) -> None:
    assert gw.last_receipt is not None
    gw.proof(gw.last_receipt["id"], timeout=60)


def test_e2ee_round_trips_leave_no_plaintext_on_the_wire(stack: Demo, policy: vc.Policy,
                                                         mitm: Mitm) -> None:
    gw = vc.connect(mitm.url, policy)
    assert gw.lease.simulated and gw.lease.app_id == GATEWAY_APP_ID
    assert gw.lease.keyset_index is not None and len(gw.lease.cosigners) == 1  # logged, witnessed
    c = sdk(gw, stack, e2ee=True)
    seen = round_trips(c, gw)
    assert gw.last_receipt["e2ee"] == {"mode": "aci-1"}
    assert gw.last_receipt["keyset_index"] == gw.lease.keyset_index
    assert len(gw.receipts) == 4
    proof = gw.proof(gw.last_receipt["id"], timeout=60)
    assert proof.startswith("c2sp.org/tlog-proof@v1")
    posts = [e for e in mitm.exchanges if e.method == "POST"]
    assert len(posts) == 4 and all(e.request_headers["x-e2ee-version"] == "aci-1"
                                   for e in posts)
    wire = b"".join(e.request_body + json.dumps(e.request_headers).encode() + e.response_body
                    + json.dumps(e.response_headers).encode() for e in mitm.exchanges)
    for text in (PROMPT, "BLUE-HERON", EMBED_INPUT, *seen):
        assert text.encode() not in wire, text
    for entry in log_entries(stack):
        for text in (PROMPT, "BLUE-HERON", EMBED_INPUT, *seen):
            assert text.encode() not in entry


def test_attested_tls_round_trips_leave_no_plaintext_on_the_wire(stack: Demo,
                                                                 policy: vc.Policy) -> None:
    tls = httpx.URL(stack.ready["gateway_tls"])
    relay = TcpRecorder(tls.host, tls.port)
    try:
        gw = vc.connect(f"https://127.0.0.1:{relay.port}", policy)
        c = sdk(gw, stack, e2ee=False)
        seen = round_trips(c, gw)
        assert gw.last_receipt["e2ee"] == {"mode": "none"}
        wait_logged(gw)
        assert relay.connections >= 2 and len(relay.data) > 1000
        for text in (PROMPT, "BLUE-HERON", EMBED_INPUT, *seen):
            assert text.encode() not in relay.data, text
        for entry in log_entries(stack):
            assert b"BLUE-HERON" not in entry and seen[0].encode() not in entry
    finally:
        relay.close()


def test_async_client_seals_and_verifies(stack: Demo, policy: vc.Policy) -> None:
    gw = vc.connect(stack.ready["gateway_tls"], policy)

    async def go() -> None:
        async with gw.async_http_client(e2ee=True) as http:
            c = openai.AsyncOpenAI(base_url=gw.base_url + "/v1",
                                   api_key=stack.ready["api_key"], http_client=http,
                                   max_retries=0)
            out = await c.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": PROMPT}])
            assert (out.choices[0].message.content or "").startswith("[demo ")
            s = await c.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": PROMPT}],
                stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
            assert text.startswith("[demo ")
            e = await c.embeddings.create(model="demo-embed", input=EMBED_INPUT)
            assert len(e.data[0].embedding) == 32
    asyncio.run(go())
    assert gw.last_receipt is not None and gw.last_receipt["e2ee"] == {"mode": "aci-1"}


def test_inclusion_required_and_lease_refreshed(stack: Demo, policy: vc.Policy) -> None:
    gw = vc.connect(stack.ready["gateway_tls"],
                    dataclasses.replace(policy, require_inclusion=True, timeout=60))
    first = gw.lease
    gw._lease = dataclasses.replace(first, expires_at=time.time() + 1)  # about to lapse
    c = sdk(gw, stack, e2ee=True)
    c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}])
    assert gw.lease.verified_at > first.verified_at  # re-attested before the call
    assert gw.lease.keyset_hash == first.keyset_hash
    # the call returned only once its receipt was in a witnessed checkpoint
    assert gw.proof(gw.last_receipt["id"], timeout=1).startswith("c2sp.org/tlog-proof@v1")


# -- attacks -------------------------------------------------------------------------------


def flip_field(body: bytes, path: tuple[Any, ...]) -> bytes:
    """`body` (JSON) with one ciphertext byte of the sealed field at `path` flipped."""
    obj = json.loads(body)
    holder = obj
    for k in path[:-1]:
        holder = holder[k]
    raw = bytearray(base64.b64decode(holder[path[-1]][len(aci.PREFIX):]))
    raw[0] ^= 1
    holder[path[-1]] = aci.PREFIX + base64.b64encode(raw).decode()
    return json.dumps(obj).encode()


def chat(c: openai.OpenAI) -> Any:
    return c.chat.completions.create(model="demo-chat",
                                     messages=[{"role": "user", "content": PROMPT}])


def test_tampered_requests_are_refused_by_the_gateway(stack: Demo, policy: vc.Policy,
                                                      mitm: Mitm) -> None:
    gw = vc.connect(mitm.url, policy)
    c = sdk(gw, stack, e2ee=True)

    def flip(ex: Exchange) -> None:
        if ex.method == "POST":
            ex.request_body = flip_field(ex.request_body, ("messages", 0, "content"))
    mitm.on_request = flip
    with pytest.raises(vc.ReceiptInvalid) as r:  # the receipt shows other bytes arrived
        chat(c)
    assert r.value.code == "digest_mismatch"
    last = mitm.exchanges[-2]  # the call (then the client fetched its receipt)
    assert last.status == 400
    assert json.loads(last.response_body)["error"]["code"] == "e2ee_decryption_failed"

    other = base64.b64encode(aci.public_key(bytes(range(32)))).decode()

    def swap_key(ex: Exchange) -> None:
        if ex.method == "POST":
            ex.request_headers["x-model-pub-key"] = other
    mitm.on_request = swap_key
    refreshes = gw.lease.verified_at
    with pytest.raises(openai.BadRequestError) as e:
        chat(c)
    assert e.value.code == "e2ee_model_key_mismatch"
    assert gw.lease.verified_at > refreshes  # it re-attested once before giving up

    mitm.on_request = None
    chat(c)
    (sent,) = [x for x in mitm.exchanges if x.method == "POST" and x.status == 200]
    replayed = mitm.replay(sent)
    assert replayed.status == 400
    assert json.loads(replayed.response_body)["error"]["code"] == "e2ee_replay_detected"

    sealed, headers, _ = aci.seal_request(
        {"model": "demo-chat", "messages": [{"role": "user", "content": PROMPT}]}, "chat",
        gw.lease.e2ee_key, now=time.time() - 400)
    r = httpx.post(stack.ready["gateway"] + "/v1/chat/completions", json=sealed, timeout=30,
                   headers={**headers, "Authorization": f"Bearer {stack.ready['api_key']}"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "e2ee_invalid_timestamp")


def test_tampered_answers_are_caught_by_the_client(stack: Demo, policy: vc.Policy,
                                                   mitm: Mitm) -> None:
    gw = vc.connect(mitm.url, policy)
    c = sdk(gw, stack, e2ee=True)
    attacks: dict[str, tuple[Any, type[Exception], str]] = {}

    def sealed_byte(ex: Exchange) -> None:
        if ex.method == "POST":
            ex.response_body = flip_field(ex.response_body,
                                          ("choices", 0, "message", "content"))
    attacks["flipped ciphertext"] = (sealed_byte, vc.E2eeError, "e2ee_response_invalid")

    def clear_member(ex: Exchange) -> None:
        if ex.method == "POST":
            obj = json.loads(ex.response_body)
            obj["usage"]["completion_tokens"] += 1
            ex.response_body = json.dumps(obj).encode()
    attacks["altered body"] = (clear_member, vc.ReceiptInvalid, "digest_mismatch")

    def in_clear(ex: Exchange) -> None:
        if ex.method == "POST":
            obj = json.loads(ex.response_body)
            obj["choices"][0]["message"]["content"] = "forged answer"
            ex.response_body = json.dumps(obj).encode()
    attacks["plaintext answer"] = (in_clear, vc.E2eeError, "e2ee_response_invalid")

    def receipt(ex: Exchange) -> None:
        if ex.path.startswith("/v1/receipts/"):
            doc = json.loads(ex.response_body)
            doc["receipt"]["route"]["provider"] = "somewhere-else"
            ex.response_body = json.dumps(doc).encode()
    attacks["altered receipt"] = (receipt, vc.ReceiptInvalid, "receipt_invalid")

    def resigned(ex: Exchange) -> None:
        if ex.path.startswith("/v1/receipts/"):
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from verifier import receipt as rc
            doc = json.loads(ex.response_body)
            body = {k: v for k, v in doc["receipt"].items() if k != "signature"}
            doc["receipt"] = rc.sign(body, Ed25519PrivateKey.generate())
            ex.response_body = json.dumps(doc).encode()
    attacks["receipt signed by another key"] = (resigned, vc.ReceiptInvalid,
                                                "receipt_key_mismatch")
    for name, (hook, exc, code) in attacks.items():
        mitm.on_response = hook
        with pytest.raises(exc) as e:
            chat(c)
        assert e.value.code == code, name

    def event(ex: Exchange) -> None:
        if ex.method == "POST":
            ex.response_body = ex.response_body.replace(b'"chat.completion.chunk"',
                                                        b'"chat.completion.chonk"', 1)
    mitm.on_response = event
    stream = c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": PROMPT}], stream=True)
    with pytest.raises(vc.ReceiptInvalid) as e:
        list(stream)
    assert e.value.code == "digest_mismatch"

    def event_ciphertext(ex: Exchange) -> None:
        if ex.method == "POST":
            lines = ex.response_body.split(b"\n\n")
            obj = json.loads(lines[2][len(b"data: "):])
            raw = bytearray(base64.b64decode(obj["choices"][0]["delta"]["content"][6:]))
            raw[-1] ^= 1
            obj["choices"][0]["delta"]["content"] = aci.PREFIX + base64.b64encode(raw).decode()
            lines[2] = b"data: " + json.dumps(obj).encode()
            ex.response_body = b"\n\n".join(lines)
    mitm.on_response = event_ciphertext
    stream = c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": PROMPT}], stream=True)
    with pytest.raises(vc.E2eeError) as e:
        list(stream)
    assert e.value.code == "e2ee_response_invalid"
    assert gw.last_receipt is None  # no answer was accepted


def test_another_tls_key_gets_no_byte(stack: Demo, policy: vc.Policy, tmp_path: Any) -> None:
    ctx, _ = tls_server_context(tmp_path)
    impostor = Mitm(stack.ready["gateway"], tls=ctx)  # terminates TLS with its own key
    try:
        gw = vc.connect(impostor.url, policy)  # the attestation proves itself, even relayed
        c = sdk(gw, stack, e2ee=False)
        with pytest.raises(vc.ChannelError) as e:
            chat(c)
        assert e.value.code == "tls_pin_mismatch"
        assert all(x.method == "GET" and x.path.startswith("/.well-known/attestation")
                   for x in impostor.exchanges)  # the prompt never reached it
    finally:
        impostor.close()


def test_forged_attestations_are_refused(stack: Demo, policy: vc.Policy, mitm: Mitm) -> None:
    from verifier.tee.keyset import keyset_hash

    def swap_keyset(ex: Exchange) -> None:
        doc = json.loads(ex.response_body)
        doc["keyset"]["e2ee_public_key"] = base64.b64encode(
            aci.public_key(bytes(range(32)))).decode()
        doc["keyset_hash"] = keyset_hash(doc["keyset"])
        ex.response_body = json.dumps(doc).encode()
    mitm.on_response = swap_keyset
    with pytest.raises(vc.AttestationFailed) as e:
        vc.connect(mitm.url, policy)
    assert e.value.code == "keyset_not_bound"

    def stale(ex: Exchange) -> None:  # an old attestation replayed for a new nonce
        ex.path = ex.path.split("?")[0] + "?nonce=" + "00" * 32
    mitm.on_response = None
    mitm.on_request = stale
    with pytest.raises(vc.AttestationFailed) as e:
        vc.connect(mitm.url, policy)
    assert e.value.code == "nonce_mismatch"
    def unlogged(ex: Exchange) -> None:  # a gateway hiding where its keyset is logged
        doc = json.loads(ex.response_body)
        doc.pop("keyset_proof", None)
        ex.response_body = json.dumps(doc).encode()
    mitm.on_request = None
    mitm.on_response = unlogged
    with pytest.raises(vc.AttestationFailed) as e:
        vc.connect(mitm.url, policy)
    assert e.value.code == "keyset_not_logged"
    mitm.on_response = None
    with pytest.raises(vc.AttestationFailed) as e:
        vc.connect(mitm.url, vc.Policy())  # strict: a simulated quote is not a TEE
    assert e.value.code == "simulated_not_allowed"
    with pytest.raises(vc.AttestationFailed) as e:
        vc.connect(mitm.url, dataclasses.replace(policy, app_id="ab" * 20))
    assert e.value.code == "app_id_mismatch"
    with pytest.raises(vc.AttestationFailed) as e:
        vc.connect(mitm.url, dataclasses.replace(policy, measurements={"mr_td": "00" * 48}))
    assert e.value.code == "measurement_mismatch"


def test_plaintext_channels_and_other_origins_are_refused(stack: Demo, policy: vc.Policy,
                                                         mitm: Mitm) -> None:
    gw = vc.connect(mitm.url, policy)
    with pytest.raises(vc.ChannelError) as e:
        chat(sdk(gw, stack, e2ee=False))
    assert e.value.code == "channel_unprotected"
    other = openai.OpenAI(base_url=stack.ready["gateway"] + "/v1", api_key="k",
                          http_client=gw.http_client(e2ee=True), max_retries=0)
    with pytest.raises(vc.ChannelError) as e:
        chat(other)
    assert e.value.code == "origin_mismatch"
    with gw.http_client(e2ee=True) as http:
        for path, body, code in (
                ("/v1/completions", {"model": "demo-chat", "prompt": PROMPT},
                 "e2ee_unsupported_endpoint"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]},
                 "e2ee_invalid_payload_model"),
                ("/v1/chat/completions", [PROMPT], "e2ee_unsealable_request")):
            with pytest.raises(vc.E2eeError) as e:
                http.post(gw.base_url + path, json=body)
            assert e.value.code == code
    assert not [x for x in mitm.exchanges if x.method == "POST"]


def test_curl_pins_the_attested_key(stack: Demo, policy: vc.Policy) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    gw = vc.connect(stack.ready["gateway_tls"], policy)
    pin = "sha256//" + base64.b64encode(bytes.fromhex(gw.lease.tls_spki_sha256)).decode()
    url = stack.ready["gateway_tls"] + "/v1/models"
    ok = subprocess.run([curl, "-sS", "-k", "--pinnedpubkey", pin, url], capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0 and "demo-chat" in ok.stdout, ok.stderr
    wrong = "sha256//" + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    bad = subprocess.run([curl, "-sS", "-k", "--pinnedpubkey", wrong, url],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "demo-chat" not in bad.stdout


def test_provider_e2ee_route_in_the_demo(stack: Demo, policy: vc.Policy) -> None:
    """The demo's `-e2ee` models reach the provider over plain HTTP, sealed to the key its
    dstack attestation names; the receipt says so."""
    gw = vc.connect(stack.ready["gateway_tls"], policy)
    c = sdk(gw, stack, e2ee=True)
    out = c.chat.completions.create(model="demo-chat-e2ee",
                                    messages=[{"role": "user", "content": PROMPT}])
    assert (out.choices[0].message.content or "").startswith("[demo ")
    up = gw.last_receipt["upstream"]
    assert up["verified"] is True and up["binding"].startswith("e2ee-key:")
    assert up["e2ee"]["mode"] == "aci-1" and up["binding"] == "e2ee-key:" + up["e2ee"]["key"]
    stream = c.chat.completions.create(model="demo-chat-e2ee", stream=True,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert "".join(ch.choices[0].delta.content or "" for ch in stream
                   if ch.choices).startswith("[demo ")
    e = c.embeddings.create(model="demo-embed-e2ee", input=EMBED_INPUT)
    assert len(e.data[0].embedding) == 32
    assert gw.last_receipt["upstream"]["e2ee"]["mode"] == "aci-1"
