"""`verifier proof` and `verifier receipt` accept a receipt only through its logged, attested
keyset entry; print as verified only what was proven; say SIMULATED and UNWITNESSED; and
verify real TDX quotes with dcap-qvl (collateral file or PCCS)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.attested_log import (
    SALT,
    AttestedLog,
    attested_log,
    make_receipt,
    proof_text,
    write_log,
)
from tests.pccs import Pccs
from tlog import checkpoint, merkle, note
from verifier import keyset_entry, receipt
from verifier.tee.keyset import keyset_hash
from witness import cosignature

WITNESS = cosignature.generate_signer("example.com/witness")


def verifier(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "verifier", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def attested() -> AttestedLog:
    return attested_log("example.com/verifier")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Any]:
    """Serve a directory on loopback; yields dir -> base URL."""
    servers = []

    def start(directory: Path) -> str:
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def cosigned(cp: bytes) -> bytes:
    text, sigs = note.split(cp)
    return note.sign(text, [], [*sigs, cosignature.cosign(cp, WITNESS)])


def logged(tmp: Path, a: AttestedLog, *receipts: dict[str, Any], witness: bool = False
           ) -> tuple[list[bytes], bytes]:
    """The attested log with `receipts` appended, written to tmp/log; (entries, checkpoint)."""
    entries = [*a.entries, *(receipt.entry(r) for r in receipts)]
    cp = write_log(tmp / "log", a.signer, entries)
    if witness:
        cp = cosigned(cp)
        (tmp / "log" / "checkpoint").write_bytes(cp)
    return entries, cp


def proof_file(tmp: Path, entries: list[bytes], index: int, cp: bytes,
               extra: bytes | None = None) -> str:
    p = tmp / f"{index}.proof"
    p.write_bytes(proof_text(entries, index, cp, extra))
    return str(p)


def test_proof_accepts_a_receipt_only_through_its_logged_attested_keyset(
        tmp_path: Path, attested: AttestedLog) -> None:
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway)
    entries, cp = logged(tmp_path, a, rec)
    pf = proof_file(tmp_path, entries, 2, cp)
    base = ["proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log")]
    ok = verifier(*base, "--allow-simulated", pf)
    assert ok.returncode == 0, ok.stderr
    assert f"receipt {rec['id']}" in ok.stdout and "keyset entry 1" in ok.stdout
    assert "SIMULATED evidence accepted" in ok.stdout
    assert "UNWITNESSED (0 witness cosignatures checked)" in ok.stdout
    out = json.loads(verifier(*base, "--allow-simulated", "--json", pf).stdout)
    assert out["simulated"] is True and out["witnessed"] is False
    assert out["keyset"]["index"] == 1 and out["receipt"]["id"] == rec["id"]
    # pins: met, and not met
    assert verifier(*base, "--allow-simulated", "--app-id", a.gateway["app_id"],
                    "--compose-hash", a.gateway["compose_hash"], pf).returncode == 0
    for pin, code in ((["--app-id", "00" * 20], "app_id_mismatch"),
                      (["--compose-hash", "ab" * 32], "compose_hash_mismatch"),
                      (["--measurement", "mr_td=" + "00" * 48], "measurement_mismatch"),
                      ([], "simulated_not_allowed")):
        r = verifier(*base, *(["--allow-simulated"] if pin else []), *pin, pf)
        assert r.returncode == 1 and code in r.stderr, (pin, r.stderr)
        assert r.stdout == ""
    # without the log the keyset cannot be checked: refused, unless asked for inclusion only
    r = verifier("proof", "--vkey", a.signer.vkey, pf)
    assert r.returncode == 1 and "--log" in r.stderr
    r = verifier("proof", "--vkey", a.signer.vkey, "--inclusion-only", pf)
    assert r.returncode == 0 and "NOT checked" in r.stdout and rec["id"] not in r.stdout


def test_receipts_without_an_attested_keyset_are_refused(tmp_path: Path,
                                                         attested: AttestedLog) -> None:
    a = attested
    rogue = Ed25519PrivateKey.generate()
    cases = {
        "fresh key": (make_receipt(rogue, a.gateway, request=b"1"), "receipt_key_mismatch"),
        "names no keyset": (make_receipt(a.receipt_key, a.gateway, request=b"2",
                                         keyset_index=0), "keyset_entry_invalid"),
        "names itself": (make_receipt(a.receipt_key, a.gateway, request=b"3",
                                      keyset_index=2), "keyset_not_before"),
        "other identity": (make_receipt(a.receipt_key, {**a.gateway, "app_id": "00"},
                                        request=b"4"), "receipt_mismatch"),
        "retired version": ({**make_receipt(a.receipt_key, a.gateway, request=b"5"),
                             "v": "pag-receipt/1"}, "receipt_invalid"),
    }
    for name, (rec, code) in cases.items():
        entries, cp = logged(tmp_path / name.replace(" ", "-"), a, rec)
        r = verifier("proof", "--vkey", a.signer.vkey, "--log",
                     str(tmp_path / name.replace(" ", "-") / "log"), "--allow-simulated",
                     proof_file(tmp_path, entries, 2, cp))
        assert r.returncode == 1 and code in r.stderr, (name, r.stderr)
        assert "OK" not in r.stdout


def test_leaf_hash_never_vouches_for_an_unmatched_extra(tmp_path: Path,
                                                        attested: AttestedLog) -> None:
    a = attested
    entries, cp = logged(tmp_path, a, make_receipt(a.receipt_key, a.gateway))
    forged = receipt.entry(make_receipt(Ed25519PrivateKey.generate(), a.gateway,
                                        route="shadow"))
    pf = proof_file(tmp_path, entries, 2, cp, extra=forged)
    leaf = merkle.leaf_hash(entries[2]).hex()
    r = verifier("proof", "--vkey", a.signer.vkey, "--leaf-hash", leaf, pf)
    assert r.returncode == 1 and "not the entry with that leaf hash" in r.stderr
    assert "shadow" not in r.stdout + r.stderr
    # a bare leaf hash proves inclusion and prints nothing about any receipt
    bare = tmp_path / "bare.proof"
    text = proof_text(entries, 2, cp).decode().splitlines(keepends=True)
    bare.write_text("".join(line for line in text if not line.startswith("extra ")))
    r = verifier("proof", "--vkey", a.signer.vkey, "--leaf-hash", leaf, str(bare))
    assert r.returncode == 0, r.stderr
    assert "receipt" not in r.stdout and "UNWITNESSED" in r.stdout


def test_quorum_defaults_to_the_witness_keys_given(tmp_path: Path,
                                                   attested: AttestedLog) -> None:
    a = attested
    entries, cp = logged(tmp_path / "u", a, make_receipt(a.receipt_key, a.gateway))
    args = ["proof", "--vkey", a.signer.vkey, "--allow-simulated", "--witness", WITNESS.vkey]
    r = verifier(*args, "--log", str(tmp_path / "u" / "log"),
                 proof_file(tmp_path, entries, 2, cp))
    assert r.returncode == 1 and "checkpoint" in r.stderr  # 1 key given: 1 required
    entries, cp = logged(tmp_path / "w", a, make_receipt(a.receipt_key, a.gateway),
                         witness=True)
    r = verifier(*args, "--log", str(tmp_path / "w" / "log"),
                 proof_file(tmp_path, entries, 2, cp))
    assert r.returncode == 0, r.stderr
    assert "cosigned by 1 of 1 witness keys" in r.stdout and "UNWITNESSED" not in r.stdout


def gateway_dir(tmp: Path, rec: dict[str, Any], entries: list[bytes], cp: bytes,
                log: str) -> Path:
    """What `GET /v1/receipts/by-request-hash/H` answers, as a static file."""
    d = tmp / "gw"
    p = d / "v1" / "receipts" / "by-request-hash" / rec["request_hash"]
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"receipt": rec, "proof": proof_text(entries, 2, cp).decode(),
                             "index": 2, "log": log}))
    return d


def test_receipt_checks_every_digest_it_has_bytes_for(tmp_path: Path, attested: AttestedLog,
                                                      serve: Any) -> None:
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway, request=b'{"q":1}', response=b'{"a":2}')
    entries, cp = logged(tmp_path, a, rec, witness=True)
    gw = serve(gateway_dir(tmp_path, rec, entries, cp, serve(tmp_path / "log")))
    (tmp_path / "req").write_bytes(b'{"q":1}')
    (tmp_path / "resp").write_bytes(b'{"a":2}')
    base = ["receipt", "--gateway", gw, "--vkey", a.signer.vkey, "--witness", WITNESS.vkey,
            "--allow-simulated", "--salt", SALT.hex()]
    r = verifier(*base, "--request", str(tmp_path / "req"), "--response", str(tmp_path / "resp"))
    assert r.returncode == 0, r.stderr
    assert "digests checked against content: request_hash, response_hash" in r.stdout
    assert "SIMULATED evidence accepted" in r.stdout
    (tmp_path / "other").write_bytes(b'{"a":3}')
    r = verifier(*base, "--request-hash", rec["request_hash"], "--response",
                 str(tmp_path / "other"))
    assert r.returncode == 1 and "digest_mismatch" in r.stderr
    r = verifier(*base[:-1], "00" * 32, "--request", str(tmp_path / "req"))
    assert r.returncode == 1  # another salt gives another request hash: no such receipt
    r = verifier("receipt", "--gateway", gw, "--vkey", a.signer.vkey, "--witness",
                 WITNESS.vkey, "--request-hash", rec["request_hash"])
    assert r.returncode == 1 and "simulated_not_allowed" in r.stderr


# -- real TDX quotes -------------------------------------------------------------------


@pytest.fixture
def tdx(testdata: Path) -> Path:
    d = testdata / "vectors" / "tdx"
    if not (d / "tdx_quote").exists():
        pytest.skip(f"TDX VECTORS ABSENT under {d}: real-quote checks not run")
    return d


def real_quote_log(tmp: Path, tdx: Path, quote_file: str) -> tuple[Path, Any, str]:
    """A log whose keyset entry carries a real TDX quote (made for another keyset, as any
    quote we can record is), logged at a time inside its collateral's window."""
    signer = note.generate_signer("example.com/real")
    key = Ed25519PrivateKey.generate()
    ks = {"receipt_signing_key": base64.b64encode(key.public_key().public_bytes_raw()).decode(),
          "e2ee_public_key": base64.b64encode(bytes(32)).decode(),
          "tls_spki_sha256": "00" * 32, "log_vkey": signer.vkey}
    entries = [b"genesis"]
    cp = checkpoint.sign(checkpoint.Checkpoint(signer.name, 1, merkle.root(
        [merkle.leaf_hash(b"genesis")])), signer)
    doc = {"v": "pag-attestation/1", "quote": (tdx / quote_file).read_bytes().hex(),
           "event_log": "[]", "simulated": False, "keyset": ks, "keyset_hash": keyset_hash(ks),
           "app_id": "a1" * 20, "compose_hash": "c0" * 32}
    at = json.loads((tdx / "expected.json").read_text())["quotes"]["tdx_quote"]["verify_at"]
    when = datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries.append(keyset_entry.entry(keyset_entry.build(doc, cp, when)))
    gateway = {"app_id": "a1" * 20, "compose_hash": "c0" * 32, "keyset_hash": keyset_hash(ks)}
    rec = make_receipt(key, gateway)
    entries.append(receipt.entry(rec))
    cp = write_log(tmp / "log", signer, entries)
    return gateway_dir(tmp, rec, entries, cp, str(tmp / "log")), signer, rec["request_hash"]


def test_receipt_verifies_real_tdx_quotes_with_dcap_qvl(tmp_path: Path, tdx: Path,
                                                         serve: Any) -> None:
    pytest.importorskip("dcap_qvl", reason="DCAP-QVL NOT INSTALLED: real quotes not checked")
    gw_dir, signer, rh = real_quote_log(tmp_path / "good", tdx, "tdx_quote")
    gw = serve(gw_dir)
    base = ["receipt", "--gateway", gw, "--vkey", signer.vkey, "--request-hash", rh]
    # the gateway names a local directory as its log: only the user may point at files
    r = verifier(*base)
    assert r.returncode == 1 and "http(s) log URL" in r.stderr, r.stderr
    base += ["--log", str(tmp_path / "good" / "log")]
    col = str(tdx / "tdx_quote_collateral.json")
    # no collateral: a real quote is never taken on trust
    r = verifier(*base)
    assert r.returncode == 1 and "quote_unverified" in r.stderr, r.stderr
    # with the collateral dcap-qvl accepts the genuine quote (UpToDate); what stops it then
    # is that its report data commits to another keyset than the entry's
    r = verifier(*base, "--collateral", col)
    assert r.returncode == 1 and "keyset_not_bound" in r.stderr, r.stderr
    # the same through a PCCS
    server = Pccs([json.loads(Path(col).read_text())])
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        r = verifier(*base, "--pccs-url", server.url)
        assert r.returncode == 1 and "keyset_not_bound" in r.stderr, r.stderr
        assert server.requests  # the collateral came from the PCCS
        # the monitor fetches collateral the same way, from inside its event loop
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({"pccs_url": server.url}))
        m = verifier("monitor", "--once", "--log", str(tmp_path / "good" / "log"), "--vkey",
                     signer.vkey, "--policy", str(policy))
        alerts = [json.loads(line) for line in m.stdout.splitlines()]
        assert [a["alert"] for a in alerts] == ["keyset_out_of_policy",
                                                "unattested_receipt"], m.stdout + m.stderr
        assert "keyset_not_bound" in alerts[0]["reason"], alerts[0]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
    # a real quote whose platform TCB matches no level: refused by dcap-qvl itself
    gw_dir, signer, rh = real_quote_log(tmp_path / "old", tdx, "tdx_quote_outdated")
    r = verifier("receipt", "--gateway", serve(gw_dir), "--vkey", signer.vkey,
                 "--request-hash", rh, "--log", str(tmp_path / "old" / "log"), "--collateral",
                 str(tdx / "tdx_quote_outdated_collateral.json"))
    assert r.returncode == 1 and "quote_verification_failed" in r.stderr, r.stderr


def test_releases_lists_each_keyset_entry_with_its_verdict(tmp_path: Path,
                                                           attested: AttestedLog) -> None:
    a = attested
    write_log(tmp_path / "log", a.signer, [*a.entries, b'{"v":"pag-keyset/1"}'])
    base = ["releases", "--log", str(tmp_path / "log"), "--vkey", a.signer.vkey,
            "--allow-simulated"]
    r = verifier(*base)
    assert r.returncode == 1 and "release at entry 2 is not verified: malformed" in r.stderr
    assert "release at entry 1" in r.stdout and "SIMULATED: verified" in r.stdout
    write_log(tmp_path / "ok", a.signer, a.entries)
    out = json.loads(verifier("releases", "--log", str(tmp_path / "ok"), "--vkey",
                              a.signer.vkey, "--allow-simulated", "--json").stdout)
    assert [(x["index"], x["app_id"], x["refusal"]) for x in out["releases"]] == [
        (1, a.gateway["app_id"], None)]
    assert out["witnessed"] is False and out["simulated"] is True


def test_audit_with_a_policy_checks_every_entry(tmp_path: Path, attested: AttestedLog) -> None:
    a = attested
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow_simulated": True, "allowed_routes": ["demo"]}))
    logged(tmp_path / "ok", a, make_receipt(a.receipt_key, a.gateway))
    base = ["audit", "--vkey", a.signer.vkey, "--policy", str(policy), "--log"]
    r = verifier(*base, str(tmp_path / "ok" / "log"))
    assert r.returncode == 0, r.stderr
    assert "1 receipt, 1 keyset" in r.stdout and "SIMULATED evidence accepted" in r.stdout
    logged(tmp_path / "bad", a, make_receipt(a.receipt_key, a.gateway, route="shadow"))
    r = verifier(*base, str(tmp_path / "bad" / "log"))
    assert r.returncode == 1 and "forbidden_route at entry 2" in r.stderr
    assert r.stdout == ""
