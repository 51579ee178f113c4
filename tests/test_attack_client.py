"""Red-team: a hostile gateway against the client SDK's verifying transport.

The gateway here is an `httpx.MockTransport` behind a real `VerifyingTransport` whose lease
is already attested (`lease_for`), so each test is one lie the gateway tells after
attestation, and the promise is that the SDK is never handed an unverified answer."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.server
import json
import threading
from collections.abc import Callable

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.test_attack_verifier_cli import _Endless
from tests.test_client import LOG, TinyLog, lease_for, signed
from tlog import merkle
from verifier import client as vc
from verifier import receipt
from verifier.tee import eventlog
from verifier.tee.keyset import keyset_hash
from verifier.transport import VerifyingTransport

BASE = "http://gw.test"
KEY = Ed25519PrivateKey.generate()
ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "forged"}}]}


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[httpx.Client,
                                                                          vc.Gateway]:
    gw = vc.Gateway(BASE, vc.Policy(allow_simulated=True), lease_for(KEY))
    t = VerifyingTransport(gw, e2ee=False, pin_tls=True, allow_plaintext=True)
    t._inner = httpx.MockTransport(handler)
    return httpx.Client(transport=t), gw


def call(c: httpx.Client) -> httpx.Response:
    r = c.post(f"{BASE}/v1/chat/completions", json={"model": "m", "messages": []})
    r.read()
    return r


@pytest.mark.parametrize("status", [201, 203, 206, 299])
def test_a_2xx_answer_without_a_receipt_is_refused(status: int) -> None:
    """Only 200 was checked for a receipt: a 203 carried a forged completion to the SDK
    (which treats every 2xx as success) with no receipt at all."""
    c, gw = client_for(lambda req: httpx.Response(status, json=ANSWER))
    with pytest.raises(vc.ReceiptInvalid) as e:
        call(c)
    assert e.value.code == "receipt_missing"
    assert gw.last_receipt is None


@pytest.mark.parametrize("status", [203, 200])
def test_a_2xx_stream_without_a_receipt_is_refused(status: int) -> None:
    body = b'data: {"choices":[{"delta":{"content":"forged"}}]}\n\ndata: [DONE]\n\n'
    c, _ = client_for(lambda req: httpx.Response(
        status, content=body, headers={"content-type": "text/event-stream"}))
    with pytest.raises(vc.ReceiptInvalid) as e, c.stream(
            "POST", f"{BASE}/v1/chat/completions", json={"model": "m", "stream": True}) as r:
        r.read()
    assert e.value.code == "receipt_missing"


def test_an_error_stream_without_a_receipt_reaches_the_sdk_as_an_error() -> None:
    """A refusal streamed as SSE without a receipt id crashed the transport with KeyError
    (it looked the receipt id up after the stream); it is an error for the SDK to raise."""
    body = b'data: {"error":{"code":"rate_limited"}}\n\n'
    c, gw = client_for(lambda req: httpx.Response(
        429, content=iter([body]), headers={"content-type": "text/event-stream"}))
    with c.stream("POST", f"{BASE}/v1/chat/completions", json={"model": "m"}) as r:
        assert r.read() == body
        assert r.status_code == 429
    assert gw.last_receipt is None


def test_a_gateway_chosen_salt_is_refused() -> None:
    """The client chooses the salt; an answer naming another salt (one the gateway could
    reuse to link calls, or publish) is refused before any receipt is fetched."""
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=ANSWER, headers={
            "x-receipt-id": "r1", "x-receipt-salt": receipt.new_salt().hex()})
    c, _ = client_for(handler)
    with pytest.raises(vc.ReceiptInvalid) as e:
        call(c)
    assert e.value.code == "receipt_mismatch"


def test_a_receipt_with_null_digests_does_not_dodge_the_check() -> None:
    """A receipt whose request/response digests are null checks nothing: refused."""
    lease = lease_for(KEY)
    seen: dict[str, bytes] = {}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            seen["salt"] = bytes.fromhex(req.headers["x-receipt-salt"])
            return httpx.Response(200, json=ANSWER, headers={"x-receipt-id": "r1"})
        body = {"v": receipt.VERSION, "id": "r1", "time": "2026-12-05T00:00:00Z",
                "gateway": {"app_id": lease.app_id, "compose_hash": lease.compose_hash,
                            "keyset_hash": lease.keyset_hash},
                "request_hash": None, "forwarded_hash": None, "route": {},
                "upstream": {"verified": True}, "provider_request_hash": None,
                "provider_response_hash": None, "response_hash": None,
                "e2ee": {"mode": "none"}, "keyset_index": 0}
        return httpx.Response(200, content=json.dumps(
            {"receipt": receipt.sign(body, KEY)}).encode())

    c, gw = client_for(handler)
    with pytest.raises(vc.ReceiptInvalid) as e:
        call(c)
    assert e.value.code == "receipt_invalid"
    assert gw.last_receipt is None


def test_two_roots_for_one_size_are_a_fork_the_client_refuses() -> None:
    """Two proofs, each valid alone, whose checkpoints give one size two roots: the log
    shows this client a split view. Without a witness nothing else catches it."""
    lease = lease_for(KEY, keyset_index=2)
    policy = vc.Policy(log_vkey=LOG.vkey)
    salt = receipt.new_salt()

    def rec_in(log: TinyLog, sent: bytes) -> tuple[dict, str]:
        r = signed(KEY, lease, salt, sent, b"answer")
        i = log.append(receipt.entry(r))
        return r, log.proof(i, ())

    honest, forked = TinyLog(), TinyLog()
    honest.append(b"keyset entry stand-in")
    forked.append(b"keyset entry stand-in")
    rec_a, proof_a = rec_in(honest, b"a")
    rec_b, proof_b = rec_in(forked, b"b")  # same size, other entry: other root
    seen: dict[int, bytes] = {}
    assert vc.check_proof(proof_a, rec_a, lease, policy, seen)
    assert vc.check_proof(proof_a, rec_a, lease, policy, seen)  # the same view again: fine
    with pytest.raises(vc.ProofInvalid) as e:
        vc.check_proof(proof_b, rec_b, lease, policy, seen)
    assert e.value.code == "log_fork"
    # a smaller checkpoint than one seen (an earlier receipt's stored proof) is no fork
    assert vc.check_proof(proof_a, rec_a, lease, policy, {99: bytes(32)})



def test_a_fork_of_the_keyset_entrys_checkpoint_is_refused() -> None:
    """The checkpoint the attestation's keyset proof was checked in is a root the client
    saw too: a receipt proof in a tree of that size with another root is a split view.
    Only receipt proofs were remembered, so the fork went unnoticed."""
    honest, forked = TinyLog(), TinyLog()
    honest.append(b"keyset entry stand-in")
    forked.append(b"keyset entry stand-in")
    honest.append(b"an entry only the attested tree has")
    lease = lease_for(KEY, keyset_index=2, keyset_checkpoint=(
        len(honest.leaves), merkle.root(honest.leaves)))
    gw = vc.Gateway(BASE, vc.Policy(log_vkey=LOG.vkey), lease)
    rec = signed(KEY, lease, receipt.new_salt(), b"a", b"answer")
    i = forked.append(receipt.entry(rec))  # same size as the attested tree, another root
    with pytest.raises(vc.ProofInvalid) as e:
        vc.check_proof(forked.proof(i, ()), rec, lease, gw.policy, gw.checkpoints)
    assert e.value.code == "log_fork"
    with pytest.raises(vc.ProofInvalid) as e:  # and a later lease naming a forked tree
        gw._remember(dataclasses.replace(lease, keyset_checkpoint=(  # noqa: SLF001
            len(forked.leaves), merkle.root(forked.leaves))))
    assert e.value.code == "log_fork"


def test_check_proof_decides_keyset_order_through_receipt_check() -> None:
    """A receipt proven at the index of the keyset entry it names (not after it): refused
    by `receipt_check.accept`, with its code, as `verifier proof` refuses it."""
    lease = lease_for(KEY, keyset_index=2)
    log = TinyLog()
    rec = signed(KEY, lease, receipt.new_salt(), b"a", b"answer")
    i = log.append(receipt.entry(rec))
    assert i == lease.keyset_index
    with pytest.raises(vc.ProofInvalid) as e:
        vc.check_proof(log.proof(i, ()), rec, lease, vc.Policy(log_vkey=LOG.vkey))
    assert e.value.code == "keyset_not_before"

def test_a_gateway_claiming_another_e2ee_key_gets_no_second_request_unattested() -> None:
    """The gateway says the sealed call used the wrong key (`e2ee_model_key_mismatch`), as
    if its E2EE key had rotated. The client re-attests before it seals again; when that
    attestation cannot be had, nothing more is sent."""
    posts = []

    def handler(req: httpx.Request) -> httpx.Response:
        posts.append(req)
        return httpx.Response(400, json={"error": {"code": "e2ee_model_key_mismatch"}})

    lease = lease_for(KEY)
    ks = {**lease.keyset, "e2ee_public_key": base64.b64encode(
        X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()}
    lease = dataclasses.replace(lease, keyset=ks, keyset_hash=keyset_hash(ks))
    gw = vc.Gateway(BASE, vc.Policy(allow_simulated=True), lease)
    t = VerifyingTransport(gw, e2ee=True, pin_tls=True, allow_plaintext=False)
    t._inner = httpx.MockTransport(handler)
    with pytest.raises(vc.AttestationFailed):
        httpx.Client(transport=t).post(f"{BASE}/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "secret"}]})
    assert len(posts) == 1
    assert b"secret" not in posts[0].content


def test_an_endless_attestation_answer_is_refused_at_the_limit() -> None:
    """The attestation is fetched before anything vouches for the connection, so anyone
    on the path can answer it. Its whole body was read before the 4 MiB check."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Endless.sent = 0
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        for connect in (lambda: vc.connect(url, vc.Policy(allow_simulated=True)),
                        lambda: asyncio.run(vc.Gateway(url, vc.Policy(), lease_for(KEY))
                                            .arefresh())):
            with pytest.raises(vc.AttestationFailed, match="too large"):
                connect()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Endless.sent < 128 << 20


DEEP = b"[" * 100_000  # JSON nested deeper than Python's parser goes (RecursionError)


class _Deep(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("content-length", str(len(DEEP)))
        self.end_headers()
        self.wfile.write(DEEP)

    def log_message(self, *args: object) -> None:
        pass


def test_json_nested_too_deep_is_a_verification_error_not_a_crash() -> None:
    """`connect` raised RecursionError (no VerificationError, no code) when anyone on the
    unauthenticated attestation fetch answered `[[[[…`; so did the event log parser and
    the receipt document. Each is now the module's own refusal."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deep)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(vc.AttestationFailed) as e:
            vc.connect(f"http://127.0.0.1:{httpd.server_address[1]}",
                       vc.Policy(allow_simulated=True))
        assert e.value.code == "malformed"
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(eventlog.EventLogError):
        eventlog.parse_event_log(DEEP.decode())

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            return httpx.Response(200, json=ANSWER, headers={"x-receipt-id": "r1"})
        return httpx.Response(200, content=DEEP)

    c, _ = client_for(handler)
    with pytest.raises(vc.ReceiptInvalid) as e2:
        call(c)
    assert e2.value.code == "receipt_invalid"
