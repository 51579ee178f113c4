"""End to end with the stock `openai` SDK against `python -m gateway demo`.

Every call's receipt must commit to the exact bytes the client sent and got
(captured below the SDK by an httpx transport wrapper), be signed by the
attested receipt key, name the route actually used with `upstream.verified`,
and be included in a log checkpoint cosigned by the demo's witness.
"""

from __future__ import annotations

import base64
import importlib.util
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.test_demo import ROOT, Demo, alive
from tlog import note
from tlog import proof as tproof
from verifier import receipt as receipts
from witness import cosignature

PROOF_WAIT = 60.0
PROMPTS = ("Say something, demo.", "Stream, please.", "alpha-embedding-input", "verify me")


class Recorded(httpx.SyncByteStream):
    """A response stream that keeps a copy of every byte the SDK reads."""

    def __init__(self, inner: httpx.SyncByteStream, sink: bytearray) -> None:
        self.inner = inner
        self.sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.sink += chunk
            yield chunk

    def close(self) -> None:
        self.inner.close()


class Capture(httpx.BaseTransport):
    """Records (request body, response headers, response bytes) of each exchange."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log: list[tuple[bytes, httpx.Headers, bytearray]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = request.read()
        resp = self.inner.handle_request(request)
        sink = bytearray()
        self.log.append((sent, resp.headers, sink))
        assert isinstance(resp.stream, httpx.SyncByteStream)
        return httpx.Response(resp.status_code, headers=resp.headers,
                              stream=Recorded(resp.stream, sink), extensions=resp.extensions)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("e2e") / "demo")
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
def client(stack: Demo) -> Iterator[tuple[openai.OpenAI, Capture]]:
    cap = Capture()
    http = httpx.Client(transport=cap, timeout=30)
    c = openai.OpenAI(base_url=stack.ready["gateway"] + "/v1", api_key=stack.ready["api_key"],
                      http_client=http, max_retries=0)
    yield c, cap
    http.close()


@pytest.fixture(scope="module")
def attested_key(stack: Demo) -> bytes:
    """The receipt key from the gateway's attestation, checked with a fresh nonce."""
    from verifier.tee import attestation

    nonce = secrets.token_hex(32)
    doc = httpx.get(stack.ready["gateway"] + "/.well-known/attestation",
                    params={"nonce": nonce}, timeout=30).json()
    attestation.check(doc, nonce=nonce, allow_simulated=True)
    assert doc["simulated"] is True
    assert doc["keyset"]["log_vkey"] == stack.ready["log_vkey"]
    return base64.b64decode(doc["keyset"]["receipt_signing_key"])


def fetch_logged(ready: dict[str, Any], receipt_id: str) -> dict[str, Any]:
    """GET /v1/receipts/{id} (as its owner) until it carries a proof (the shipper logs
    asynchronously)."""
    deadline = time.monotonic() + PROOF_WAIT
    while True:
        r = httpx.get(f"{ready['gateway']}/v1/receipts/{receipt_id}", timeout=10,
                      headers={"Authorization": f"Bearer {ready['api_key']}"})
        assert r.status_code == 200, r.text
        doc = r.json()
        if doc["proof"] is not None or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def check_exchange(stack: Demo, key: bytes, sent: bytes, headers: httpx.Headers,
                   got: bytes, route_id: str, model: str) -> dict[str, Any]:
    """Every receipt property the issue asks for; returns the logged receipt document."""
    salt = bytes.fromhex(headers["x-receipt-salt"])
    request_hash = receipts.digest(salt, sent)
    assert headers["x-request-hash"] == request_hash
    doc = fetch_logged(stack.ready, headers["x-receipt-id"])
    rec = doc["receipt"]
    assert rec["id"] == headers["x-receipt-id"]
    assert rec["request_hash"] == request_hash
    assert rec["response_hash"] == receipts.digest(salt, got)
    # No E2EE: the gateway relays the provider's bytes unchanged.
    assert rec["provider_response_hash"] == rec["response_hash"]
    assert rec["route"]["route_id"] == route_id and rec["route"]["model"] == model
    assert rec["upstream"]["verified"] is True
    assert rec["upstream"]["evidence"] == "dstack-simulated"
    assert rec["upstream"]["binding"].startswith("tls")
    assert "refusal" not in rec
    assert receipts.verify(rec, expected_key=key) == key
    # The proof: the receipt's entry under a checkpoint the witness cosigned.
    assert doc["proof"] is not None, "receipt not logged in time"
    p = tproof.parse(doc["proof"].encode())
    w = cosignature.verify_witnessed(
        p.checkpoint, note.verifier_from_vkey(stack.ready["log_vkey"]),
        [cosignature.verifier_from_vkey(stack.ready["witness_vkey"])], quorum=1)
    assert len(w.cosigners) == 1
    tproof.check_inclusion(p, w.checkpoint, receipts.entry(rec))
    assert p.index == doc["index"]
    # Nothing of the prompt or completion in the log entry.
    assert b"demo provider" not in receipts.entry(rec)
    return doc


def test_models(stack: Demo, client: tuple[openai.OpenAI, Capture]) -> None:
    c, _ = client
    ids = {m.id for m in c.models.list()}
    assert {"demo-chat", "demo-embed"} <= ids


def test_chat_non_streaming(stack: Demo, client: tuple[openai.OpenAI, Capture],
                            attested_key: bytes) -> None:
    c, cap = client
    out = c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Say something, demo."}])
    assert out.choices[0].message.content.startswith("[demo ")
    assert out.usage is not None and out.usage.total_tokens > 0
    (sent, headers, got), = cap.log
    check_exchange(stack, attested_key, sent, headers, bytes(got), "demo-dstack", "demo-chat")


def test_chat_streaming_with_usage(stack: Demo, client: tuple[openai.OpenAI, Capture],
                                   attested_key: bytes) -> None:
    c, cap = client
    stream = c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream, please."}],
        stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts).startswith("[demo ")
    assert usage is not None and usage.completion_tokens == len("".join(parts).split())
    (sent, headers, got), = cap.log
    assert got.endswith(b"data: [DONE]\n\n")
    doc = check_exchange(stack, attested_key, sent, headers, bytes(got), "demo-dstack",
                         "demo-chat")
    assert doc["receipt"]["usage"]["total_tokens"] == usage.total_tokens


def test_embeddings(stack: Demo, client: tuple[openai.OpenAI, Capture],
                    attested_key: bytes) -> None:
    c, cap = client
    out = c.embeddings.create(model="demo-embed", input=["alpha-embedding-input", "beta"])
    assert [e.index for e in out.data] == [0, 1]
    assert len(out.data[0].embedding) == 32 and out.data[0].embedding != out.data[1].embedding
    (sent, headers, got), = cap.log
    check_exchange(stack, attested_key, sent, headers, bytes(got), "demo-dstack-embed",
                   "demo-embed")


def test_provider_is_callable_directly(stack: Demo) -> None:
    c = openai.OpenAI(base_url=stack.ready["provider"], api_key="unused", max_retries=0)
    out = c.chat.completions.create(model="demo-chat-1",
                                    messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content.startswith("[demo ")


def test_refusal_carries_a_receipt(stack: Demo, client: tuple[openai.OpenAI, Capture]) -> None:
    c, cap = client
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model",
                                  messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    (sent, headers, _), = cap.log
    assert headers["x-request-hash"] == receipts.digest(bytes.fromhex(headers["x-receipt-salt"]),
                                                       sent)
    r = httpx.get(f"{stack.ready['gateway']}/v1/receipts/{headers['x-receipt-id']}", timeout=10,
                  headers={"Authorization": f"Bearer {stack.ready['api_key']}"})
    assert r.json()["receipt"]["refusal"]["code"] == "model_not_found"


@pytest.mark.skipif(importlib.util.find_spec("verifier.__main__") is None,
                    reason="verifier CLI (python -m verifier) not in this tree yet")
def test_verifier_cli_checks_the_proof_and_the_receipt(
        stack: Demo, client: tuple[openai.OpenAI, Capture], attested_key: bytes,
        tmp_path: Path) -> None:
    c, cap = client
    c.chat.completions.create(model="demo-chat",
                              messages=[{"role": "user", "content": "verify me"}])
    (sent, headers, got), = cap.log
    doc = check_exchange(stack, attested_key, sent, headers, bytes(got), "demo-dstack",
                         "demo-chat")
    proof_file = tmp_path / "receipt.proof"
    proof_file.write_text(doc["proof"])
    ready = stack.ready
    ok = subprocess.run([sys.executable, "-m", "verifier", "proof", "--vkey", ready["log_vkey"],
                         "--witness", ready["witness_vkey"], "--quorum", "1", "--log",
                         ready["tlog"], "--allow-simulated", str(proof_file)],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    receipt_cmd = [sys.executable, "-m", "verifier", "receipt", "--gateway", ready["gateway"],
                   "--request-hash", headers["x-request-hash"], "--witness",
                   ready["witness_vkey"], "--quorum", "1"]
    r = subprocess.run([*receipt_cmd, "--allow-simulated"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    strict = subprocess.run(receipt_cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert strict.returncode != 0 and "simulated" in strict.stderr
    tampered = tmp_path / "bad.proof"
    tampered.write_text(doc["proof"].replace("index ", "index 1", 1))
    bad = subprocess.run([sys.executable, "-m", "verifier", "proof", "--vkey",
                          ready["log_vkey"], "--witness", ready["witness_vkey"], "--quorum",
                          "1", str(tampered)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0


def test_sigterm_stops_every_part_and_logs_hold_no_content(stack: Demo) -> None:
    """Runs last in this module: stops the shared demo, then reads every part's log."""
    children = stack.children | set()
    assert len(children) >= 6
    assert stack.terminate() == 0
    assert alive(children) == set()
    logs = sorted((stack.data / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"gateway", "tlog", "witness", "provider"}
    for path in logs:
        text = path.read_text(errors="replace")
        for content in (*PROMPTS, "[demo "):
            assert content not in text, f"{content!r} leaked into {path.name}"
