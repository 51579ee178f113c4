"""verifier.client without the demo: `attest` (logged keyset entry, witness quorum, pins),
`check_receipt`, `check_proof`, the TLS pin at the handshake, and key rotation (the
client re-attests and retries once) against an in-process gateway."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.api.attestation import AttestationDocuments
from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from gateway.receipts.outbox import ReceiptSigner
from tests.test_attestation import APP_ID, COMPOSE, _with_sim
from tests.test_gateway_fakes import API_KEY, FakeProvider, run_gateway, write_config
from tlog import checkpoint, merkle, note, proof
from verifier import aci, keyset_entry, pinning, receipt
from verifier import client as vc
from verifier.tee.keyset import keyset_hash
from witness import cosignature

LOG = note.generate_signer("example.com/log")
WITNESS = cosignature.generate_signer("example.com/witness")
OTHER_WITNESS = cosignature.generate_signer("example.com/other")
NONCE = secrets.token_hex(32)


class TinyLog:
    """An in-memory log: entries, a signed checkpoint cosigned by WITNESS, proofs."""

    def __init__(self) -> None:
        self.leaves: list[bytes] = []
        self.entries: list[bytes] = [b"first entry", b"second entry"]
        self.leaves = [merkle.leaf_hash(e) for e in self.entries]

    def checkpoint(self, witnesses: tuple[cosignature.CosignatureSigner, ...] = (WITNESS,)
                   ) -> bytes:
        cp = checkpoint.sign(checkpoint.Checkpoint(LOG.name, len(self.leaves),
                                                   merkle.root(self.leaves)), LOG)
        text, sigs = note.split(cp)
        return note.sign(text, [], [*sigs, *(cosignature.cosign(cp, w) for w in witnesses)])

    def append(self, entry: bytes) -> int:
        self.entries.append(entry)
        self.leaves.append(merkle.leaf_hash(entry))
        return len(self.entries) - 1

    def proof(self, index: int, witnesses: tuple[cosignature.CosignatureSigner, ...] = (WITNESS,)
              ) -> str:
        p = proof.TlogProof(index, tuple(merkle.inclusion_proof(index, len(self.leaves),
                                                                self.leaves)),
                            self.checkpoint(witnesses), self.entries[index])
        return p.format().decode()


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A gateway keyset logged in a TinyLog, and a fresh attestation naming the entry."""
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="pagc-", dir="/tmp"))
    log = TinyLog()
    cp = log.checkpoint()

    async def fn(client: Any, srv: Any) -> dict[str, Any]:
        gk = await keys.load(client, log_vkey=LOG.vkey)
        entry_doc = await identity_attestation.build(client, gk, keyset_entry.nonce_for(cp))
        index = log.append(keyset_entry.entry(keyset_entry.build(entry_doc, cp,
                                                                 "2026-12-04T00:00:00Z")))
        doc = await identity_attestation.build(client, gk, NONCE)
        doc["keyset_index"] = index
        doc["keyset_proof"] = log.proof(index)
        other = await keys.load(client, log_vkey="")
        return {"doc": doc, "log": log, "keys": gk, "unlogged": await identity_attestation.build(
            client, other, NONCE)}

    try:
        return _with_sim(short, fn)
    finally:
        shutil.rmtree(short, ignore_errors=True)


POLICY = vc.Policy(allow_simulated=True, app_id=APP_ID, compose_hash=COMPOSE,
                   log_vkey=LOG.vkey, witness_vkeys=(WITNESS.vkey,), quorum=1)


def code_of(fn: Any) -> str:
    with pytest.raises(vc.VerificationError) as e:
        fn()
    return e.value.code


def test_a_logged_witnessed_keyset_is_accepted(logged: dict[str, Any]) -> None:
    lease = vc.attest(logged["doc"], NONCE, POLICY, time.time())
    assert lease.keyset_index == logged["doc"]["keyset_index"]
    assert lease.cosigners == (WITNESS.name,)
    size = logged["doc"]["keyset_index"] + 1  # the proof was made right after the append
    assert lease.keyset_checkpoint == (size, merkle.root(logged["log"].leaves[:size]))
    assert lease.simulated and lease.app_id == APP_ID
    assert lease.keyset == logged["keys"].to_json()
    assert vc.attest(logged["doc"], NONCE, vc.Policy(allow_simulated=True), time.time()) \
        .keyset_index is None  # a policy without the log does not look for the entry


def test_log_and_witness_attacks_are_refused(logged: dict[str, Any]) -> None:
    doc, log = logged["doc"], logged["log"]
    now = time.time()

    def with_(**members: Any) -> dict[str, Any]:
        d = copy.deepcopy(doc)
        d.update(members)
        return {k: v for k, v in d.items() if v is not None}

    cases = {
        "no entry shown": (with_(keyset_proof=None), POLICY, "keyset_not_logged"),
        "another index": (with_(keyset_index=0), POLICY, "keyset_not_logged"),
        "not an entry": (with_(keyset_proof=log.proof(0), keyset_index=0), POLICY,
                         "keyset_not_logged"),
        "unwitnessed": (with_(keyset_proof=log.proof(doc["keyset_index"], ())), POLICY,
                        "keyset_not_logged"),
        "other witness": (with_(keyset_proof=log.proof(doc["keyset_index"],
                                                       (OTHER_WITNESS,))), POLICY,
                          "keyset_not_logged"),
        "other log": (doc, vc.Policy(allow_simulated=True, log_vkey=note.generate_signer(
            "example.com/log").vkey), "log_key_mismatch"),
        "compose pin": (doc, vc.Policy(allow_simulated=True, compose_hash="d0" * 32,
                                       log_vkey=LOG.vkey), "compose_hash_mismatch"),
        "release needs witnesses": (doc, vc.Policy(allow_simulated=True, log_vkey=LOG.vkey,
                                                   require_logged_release=True),
                                    "policy_invalid"),
        "quorum over keys": (doc, vc.Policy(allow_simulated=True, log_vkey=LOG.vkey, quorum=2),
                             "policy_invalid"),
        "empty measurement set": (doc, vc.Policy(allow_simulated=True, measurements={}),
                                  "policy_invalid"),
    }
    for name, (d, policy, code) in cases.items():
        assert code_of(lambda d=d, p=policy: vc.attest(d, NONCE, p, now)) == code, name
    # the entry of another keyset, well logged, does not vouch for this one
    other = logged["unlogged"]
    forged = with_(keyset=other["keyset"], keyset_hash=other["keyset_hash"],
                   quote=other["quote"], report_data=other["report_data"])
    forged["keyset"]["log_vkey"] = LOG.vkey
    assert code_of(lambda: vc.attest(forged, NONCE, POLICY, now)) in (
        "keyset_not_bound", "keyset_hash_mismatch")
    assert code_of(lambda: vc.attest(doc, secrets.token_hex(32), POLICY, now)) == \
        "nonce_mismatch"
    assert code_of(lambda: vc.attest(doc, NONCE, vc.Policy(), now)) == "simulated_not_allowed"


def test_real_quotes_need_collateral(logged: dict[str, Any]) -> None:
    policy = vc.Policy(collateral_file="/nonexistent/collateral.json")
    assert code_of(lambda: vc.attest(logged["doc"], NONCE, policy, time.time())) == \
        "policy_invalid"


# -- receipts and proofs -----------------------------------------------------------------


def lease_for(key: Ed25519PrivateKey, **kw: Any) -> vc.Lease:
    ks = {"receipt_signing_key": base64.b64encode(key.public_key().public_bytes_raw()).decode(),
          "e2ee_public_key": base64.b64encode(bytes(32)).decode(),
          "tls_spki_sha256": "00" * 32, "log_vkey": LOG.vkey}
    return vc.Lease(keyset=ks, keyset_hash=keyset_hash(ks), app_id=APP_ID,
                    compose_hash=COMPOSE, simulated=True, measurements={},
                    verified_at=0.0, expires_at=1e12, **kw)


def signed(key: Ed25519PrivateKey, lease: vc.Lease, salt: bytes, sent: bytes, got: bytes,
           **over: Any) -> dict[str, Any]:
    body = {"v": receipt.VERSION, "id": "r1", "time": "2026-12-04T00:00:00.000Z",
            "gateway": {"app_id": lease.app_id, "compose_hash": lease.compose_hash,
                        "keyset_hash": lease.keyset_hash},
            "request_hash": receipt.digest(salt, sent), "forwarded_hash": None,
            "route": {}, "upstream": {"verified": False}, "provider_request_hash": None,
            "provider_response_hash": None, "response_hash": receipt.digest(salt, got),
            "e2ee": {"mode": "aci-1"}, "keyset_index": 2}
    body.update(over)
    return receipt.sign(body, key)


def test_check_receipt_refuses_every_mismatch() -> None:
    key = Ed25519PrivateKey.generate()
    lease = lease_for(key, keyset_index=2)
    salt, sent, got = secrets.token_bytes(32), b'{"q":1}', b'{"a":2}'

    def check(rec: Any, **kw: Any) -> dict[str, Any]:
        args = {"receipt_id": "r1", "salt": salt, "sent": sent,
                "response_hash": receipt.digest(salt, got), "e2ee_modes": ("aci-1",)}
        args.update(kw)
        return vc.check_receipt(rec, lease, **args)

    good = signed(key, lease, salt, sent, got)
    assert check(good) == good
    tampered = copy.deepcopy(good)
    tampered["route"] = {"route_id": "x"}
    cases = {
        "altered": (tampered, {}, "receipt_invalid"),
        "other key": (signed(Ed25519PrivateKey.generate(), lease, salt, sent, got), {},
                      "receipt_key_mismatch"),
        "other id": (good, {"receipt_id": "r2"}, "receipt_mismatch"),
        "other keyset": (signed(key, lease, salt, sent, got, keyset_index=1), {},
                         "receipt_mismatch"),
        "other gateway": (signed(key, lease, salt, sent, got, gateway={
            "app_id": "00", "compose_hash": COMPOSE, "keyset_hash": lease.keyset_hash}), {},
                          "receipt_mismatch"),
        "not sealed": (signed(key, lease, salt, sent, got, e2ee={"mode": "none"}), {},
                       "receipt_mismatch"),
        "other request": (good, {"sent": b'{"q":2}'}, "digest_mismatch"),
        "other salt": (good, {"salt": secrets.token_bytes(32)}, "digest_mismatch"),
        "other response": (good, {"response_hash": receipt.digest(salt, b"x")},
                           "digest_mismatch"),
        "not a receipt": ({"v": "pag-receipt/1"}, {}, "receipt_invalid"),
    }
    for name, (rec, kw, code) in cases.items():
        assert code_of(lambda r=rec, k=kw: check(r, **k)) == code, name


def test_check_proof_needs_the_witnessed_inclusion() -> None:
    key = Ed25519PrivateKey.generate()
    lease = lease_for(key, keyset_index=2)
    salt = secrets.token_bytes(32)
    log = TinyLog()
    log.append(b"keyset entry stand-in")
    rec = signed(key, lease, salt, b"a", b"b")
    idx = log.append(receipt.entry(rec))
    policy = vc.Policy(log_vkey=LOG.vkey, witness_vkeys=(WITNESS.vkey,))
    assert vc.check_proof(log.proof(idx), rec, lease, policy)
    other = copy.deepcopy(rec)
    other["id"] = "r9"
    for text, pol in ((log.proof(idx), dataclasses_replace(policy, witness_vkeys=(
            OTHER_WITNESS.vkey,))), (log.proof(idx, ()), policy), (log.proof(idx - 1), policy)):
        assert code_of(lambda t=text, p=pol: vc.check_proof(t, rec, lease, p)) == \
            "proof_invalid"
    assert code_of(lambda: vc.check_proof(log.proof(idx), other, lease, policy)) == \
        "proof_invalid"


def dataclasses_replace(p: vc.Policy, **kw: Any) -> vc.Policy:
    import dataclasses

    return dataclasses.replace(p, **kw)


def test_the_pin_is_checked_before_any_request_byte(tmp_path: Path) -> None:
    from tests.test_gateway_fakes import tls_server_context

    ctx, spki = tls_server_context(tmp_path)
    seen: list[bytes] = []

    async def serve() -> tuple[asyncio.Server, int]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read(65536)
            seen.append(data)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await w.drain()
            w.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        return srv, srv.sockets[0].getsockname()[1]

    async def go() -> None:
        srv, port = await serve()
        url = f"https://127.0.0.1:{port}/"
        ok = await asyncio.to_thread(
            lambda: httpx.get(url, verify=pinning.pinned_context(lambda: spki)).text)
        assert ok == "ok"
        for expected in ("00" * 32, spki[::-1]):
            with pytest.raises(httpx.ConnectError) as e:
                await asyncio.to_thread(
                    lambda x=expected: httpx.get(url, verify=pinning.pinned_context(lambda: x)))
            assert pinning.find_mismatch(e.value) is not None
            async with httpx.AsyncClient(verify=pinning.pinned_context(
                    lambda x=expected: x)) as c:
                with pytest.raises(httpx.ConnectError) as e:
                    await c.get(url)
            assert isinstance(pinning.find_mismatch(e.value), ssl.SSLError)
        srv.close()
    asyncio.run(go())
    requests = [d for d in seen if d]
    assert len(requests) == 1 and requests[0].startswith(b"GET / ")  # only the accepted one


# -- key rotation against an in-process gateway ------------------------------------------------


def test_key_rotation_reattests_and_retries_once(tmp_path: Path, short_dir: Path) -> None:
    """The gateway's E2EE key, then its receipt key, change (and its attestation with them):
    the client's next call is refused (`e2ee_model_key_mismatch`, nothing forwarded) or
    signed by an unknown key; it re-attests, and goes on under the new lease."""

    async def fn(dstack: Any, srv: Any) -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url)) as gw:
                state: dict[str, Any] = {"receipt": gw.receipt_key, "e2ee": gw.e2ee_key}

                def keyset() -> dict[str, str]:
                    return {"receipt_signing_key": base64.b64encode(
                                state["receipt"].public_key().public_bytes_raw()).decode(),
                            "e2ee_public_key": base64.b64encode(
                                state["e2ee"].public_key().public_bytes_raw()).decode(),
                            "tls_spki_sha256": "00" * 32, "log_vkey": ""}

                async def attest(nonce: str | None) -> dict[str, Any]:
                    return await identity_attestation.build(dstack, keyset(), nonce)

                def rotate(what: str) -> None:
                    svc = gw.app.svc
                    if what == "e2ee":
                        state["e2ee"] = X25519PrivateKey.generate()
                        svc.e2ee_key = state["e2ee"].private_bytes_raw()
                        svc.e2ee_public = aci.public_key(svc.e2ee_key)
                    else:
                        state["receipt"] = Ed25519PrivateKey.generate()
                        svc.signer = ReceiptSigner(state["receipt"])
                    svc.identity = {"app_id": APP_ID, "compose_hash": COMPOSE,
                                    "keyset_hash": keyset_hash(keyset())}

                gw.app.attestations = AttestationDocuments(
                    attest, ttl=0.0, per_client_per_minute=1000, global_per_second=1000)
                rotate("none")
                await asyncio.to_thread(run_client, gw.url, rotate, prov)
        finally:
            await prov.stop()

    _with_sim(short_dir, fn)


def run_client(url: str, rotate: Any, prov: FakeProvider) -> None:
    import openai

    gw = vc.connect(url, vc.Policy(allow_simulated=True, app_id=APP_ID))
    c = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0,
                      http_client=gw.http_client(e2ee=True))

    def call() -> str:
        out = c.chat.completions.create(model="chat-model",
                                        messages=[{"role": "user", "content": "hi"}])
        return out.choices[0].message.content or ""

    assert call()
    first = gw.lease
    rotate("e2ee")
    before = len(prov.received)
    assert call()
    assert gw.lease.e2ee_key != first.e2ee_key and len(prov.received) == before + 1
    rotate("receipt")
    assert call()
    assert gw.lease.receipt_key != first.receipt_key
    assert gw.last_receipt is not None and json.dumps(gw.last_receipt)


def test_the_client_runs_on_the_base_dependencies_only() -> None:
    """A client-only install has no server packages: importing and sealing must not need
    them (the issue's `ModuleNotFoundError: orjson`)."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys
SERVER = {"gateway", "aiohttp", "orjson", "fastapi", "uvicorn", "redis", "psycopg",
          "dstack_sdk", "dcap_qvl", "uvloop"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in SERVER:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import time
from verifier import aci, client, sse, transport
sealed, headers, _ = aci.seal_request({"model": "m", "messages": [{"role": "user",
    "content": "x"}]}, "chat", aci.public_key(bytes(range(32))), now=time.time())
print(headers["x-e2ee-version"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "aci-1", r.stderr
