"""Gateway keys from dstack KMS, the attestation document, and its pure check."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from gateway.identity.dstack_sim import SimulatorServer
from verifier.tee import attestation, eventlog, quote
from verifier.tee import keyset as keyset_fmt
from verifier.tee.attestation import AttestationError

dstack_sdk = pytest.importorskip("dstack_sdk")

APP_ID = "a1" * 20
COMPOSE = "c0" * 32
VKEY = "example.com/log+01020304+AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="


def _with_sim(short_dir: Path, fn: Any, **kw: Any) -> Any:
    """Run `fn(client, server)` against a fresh simulator on a temp socket."""
    sock = short_dir / "s.sock"

    async def run() -> Any:
        async with SimulatorServer(sock, short_dir / "data", app_id=APP_ID,
                                   compose_hash=COMPOSE, **kw) as srv:
            return await fn(dstack_sdk.AsyncDstackClient(str(sock)), srv)

    return asyncio.run(run())


def _build(short_dir: Path, nonce: str | None = "n-123") -> tuple[dict[str, Any], Any]:
    async def fn(client: Any, srv: Any) -> tuple[dict[str, Any], Any]:
        gk = await keys.load(client, log_vkey=VKEY)
        return await identity_attestation.build(client, gk, nonce), gk

    return _with_sim(short_dir, fn)


# -- keys -----------------------------------------------------------------------------

def test_keyset_is_deterministic_and_well_formed(short_dir: Path) -> None:
    async def fn(client: Any, srv: Any) -> tuple[Any, bytes, bytes, bytes]:
        gk = await keys.load(client, log_vkey=VKEY)
        return (gk, await keys.derive_seed(client, "tlog/note"),
                await keys.derive_seed(client, "tlog/note"),
                await keys.derive_seed(client, "witness/note"))

    gk1, s1, s1b, s2 = _with_sim(short_dir, fn)
    gk2, s1_again, _, _ = _with_sim(short_dir, fn)  # restart, same data dir
    assert gk1.to_json() == gk2.to_json() and s1 == s1b == s1_again
    assert len(s1) == 32 and s1 != s2
    Ed25519PrivateKey.from_private_bytes(s1)  # usable as a note-signing seed
    ks = gk1.to_json()
    assert list(ks) == list(keyset_fmt.KEYSET_FIELDS) and ks["log_vkey"] == VKEY
    assert base64.b64decode(ks["receipt_signing_key"]) == \
        gk1.receipt_key.public_key().public_bytes_raw()
    assert base64.b64decode(ks["e2ee_public_key"]) == \
        gk1.e2ee_key.public_key().public_bytes_raw()
    assert len(gk1.e2ee_private_bytes()) == 32
    assert gk1.keyset_hash() == hashlib.sha256(rfc8785.dumps(ks)).hexdigest()
    assert gk1.keyset_hash() != keyset_fmt.Keyset.from_json({**ks, "log_vkey": "x"}).keyset_hash()
    # Receipt, E2EE and TLS keys are independent of each other.
    assert len({ks["receipt_signing_key"], ks["e2ee_public_key"]}) == 2


def test_tls_files_match_attested_spki(short_dir: Path) -> None:
    gk = _with_sim(short_dir, lambda c, s: keys.load(c))
    cert_path, key_path = keys.write_tls_files(gk, short_dir / "tls")
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert keyset_fmt.spki_sha256(cert.public_key()) == gk.keyset.tls_spki_sha256
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_path), str(key_path))  # key and certificate match


def test_keyset_from_json_validates() -> None:
    good = {"receipt_signing_key": base64.b64encode(bytes(32)).decode(),
            "e2ee_public_key": base64.b64encode(bytes(32)).decode(),
            "tls_spki_sha256": "ab" * 32, "log_vkey": VKEY}
    assert keyset_fmt.Keyset.from_json(good).to_json() == good
    for bad in ({**good, "extra": "x"}, {**good, "tls_spki_sha256": "AB" * 32},
                {**good, "e2ee_public_key": base64.b64encode(bytes(31)).decode()}):
        with pytest.raises(keyset_fmt.KeysetError):
            keyset_fmt.Keyset.from_json(bad)


# -- build + check --------------------------------------------------------------------

def test_document_shape_and_report_data_rule(short_dir: Path) -> None:
    doc, gk = _build(short_dir)
    json.dumps(doc)  # JSON-serialisable
    assert doc["simulated"] is True and doc["nonce"] == "n-123"
    assert doc["keyset"] == gk.to_json() and doc["keyset_hash"] == gk.keyset_hash()
    assert doc["app_id"] == APP_ID and doc["compose_hash"] == COMPOSE
    expected = bytes.fromhex(gk.keyset_hash()) + hashlib.sha256(b"n-123").digest()
    assert doc["report_data"] == expected.hex()
    assert quote.parse_quote(bytes.fromhex(doc["quote"])).report.report_data == expected
    no_nonce, _ = _build(short_dir, None)
    assert "nonce" not in no_nonce and no_nonce["report_data"].endswith("00" * 32)


def test_check_passes_only_when_simulation_allowed(short_dir: Path) -> None:
    doc, gk = _build(short_dir)
    facts = attestation.check(doc, nonce="n-123", allow_simulated=True,
                              expected_app_id=APP_ID.upper(), expected_compose_hash=COMPOSE)
    assert facts.simulated and facts.app_id == APP_ID and facts.compose_hash == COMPOSE
    assert facts.keyset_hash == gk.keyset_hash() and facts.nonce == "n-123"
    assert facts.key_provider is not None and facts.key_provider["name"] == "kms"
    with pytest.raises(AttestationError) as e:
        attestation.check(doc, nonce="n-123")
    assert e.value.code == "simulated_not_allowed"


def _code(doc: dict[str, Any], **kw: Any) -> str:
    kw.setdefault("allow_simulated", True)
    with pytest.raises(AttestationError) as e:
        attestation.check(doc, **kw)
    return e.value.code


def test_tampering_is_refused_with_distinct_codes(short_dir: Path) -> None:
    doc, _ = _build(short_dir)
    other_key = base64.b64encode(Ed25519PrivateKey.generate().public_key()
                                 .public_bytes_raw()).decode()

    swapped = copy.deepcopy(doc)
    swapped["keyset"]["receipt_signing_key"] = other_key
    assert _code(swapped) == "keyset_hash_mismatch"
    swapped["keyset_hash"] = keyset_fmt.keyset_hash(swapped["keyset"])  # consistent, but unattested
    assert _code(swapped) == "keyset_not_bound"

    assert _code(doc, nonce="another-nonce") == "nonce_mismatch"
    renonced = {**doc, "nonce": "another-nonce"}
    assert _code(renonced) == "nonce_mismatch"

    log = json.loads(doc["event_log"])
    idx = next(i for i, e in enumerate(log) if e["event"] == "compose-hash")
    log[idx]["event_payload"] = "ee" * 32
    log[idx]["digest"] = eventlog.runtime_event_digest("compose-hash", b"\xee" * 32).hex()
    assert _code({**doc, "event_log": json.dumps(log)}) == "rtmr3_mismatch"

    assert _code(doc, expected_app_id="00" * 20) == "app_id_mismatch"
    assert _code(doc, expected_compose_hash="00" * 32) == "compose_hash_mismatch"
    assert _code({**doc, "app_id": "00" * 20}) == "identity_mismatch"
    assert _code({**doc, "event_log": "[{]"}) == "event_log_invalid"
    assert _code({**doc, "report_data": "00" * 64}) == "report_data_mismatch"
    assert _code({**doc, "quote": doc["quote"][:200]}) == "quote_invalid"
    assert _code({k: v for k, v in doc.items() if k != "keyset"}) == "malformed"
    assert _code({**doc, "simulated": False}) == "malformed"


def test_partially_forged_simulated_quote_is_refused(short_dir: Path) -> None:
    doc, _ = _build(short_dir)
    raw = bytearray(bytes.fromhex(doc["quote"]))
    raw[-1] ^= 1  # no longer exactly simulated, still carries the vendor marker
    called: list[bytes] = []
    code = _code({**doc, "quote": raw.hex(), "simulated": False},
                 verify_quote=lambda q: called.append(q))
    assert code == "quote_invalid" and not called


def _real_doc(testdata: Path) -> dict[str, Any]:
    path = testdata / "vectors" / "tdx" / "tdx_quote"
    if not path.is_file():
        pytest.skip("TDX quote vectors absent")
    ks = {"receipt_signing_key": base64.b64encode(bytes(32)).decode(),
          "e2ee_public_key": base64.b64encode(bytes(32)).decode(),
          "tls_spki_sha256": "00" * 32, "log_vkey": ""}
    return {"quote": path.read_bytes().hex(), "event_log": "[]", "simulated": False,
            "keyset": ks, "keyset_hash": keyset_fmt.keyset_hash(ks)}


def test_real_quote_needs_a_verifier(testdata: Path) -> None:
    doc = _real_doc(testdata)
    assert _code(doc, allow_simulated=False) == "quote_unverified"

    def reject(q: bytes) -> None:
        raise ValueError("ISV enclave report signature is invalid")

    assert _code(doc, verify_quote=reject) == "quote_verification_failed"
    # An accepting verifier gets past the signature step; this quote's report
    # data does not commit to our keyset, so the binding check refuses it.
    assert _code(doc, verify_quote=lambda q: "ok") == "keyset_not_bound"


def test_check_is_importable_without_dcap_qvl() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['dcap_qvl'] = None; sys.modules['fastapi'] = None; "
            "import verifier.tee.attestation, verifier.tee.quote, verifier.tee.eventlog, gateway.identity.keys")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
