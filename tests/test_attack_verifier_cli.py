"""Red-team: a hostile log (or a hostile gateway with an attested key) against what
`python -m verifier` prints. Output is for a human at a terminal: no text from a log entry
may carry a control character (an escape sequence that rewrites the screen, a newline that
starts a forged "verified" line, a bidi override) into it."""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from tests.attested_log import AttestedLog, attested_log, make_receipt, write_log
from tests.test_attestation import _with_sim
from tests.test_verifier_receipt import logged, proof_file, verifier
from tlog import checkpoint
from verifier import client as vc
from verifier import keyset_entry, receipt, receipt_check
from verifier.source import SourceError, read_source

# C0/C1 controls (ESC, BEL, CR, LF inside a value...) and the bidi overrides.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE = "x\x1b[2K\r\n   release at entry 9: app forged SIMULATED: verified\x07\u202egnp"


@pytest.fixture(scope="module")
def attested() -> AttestedLog:
    return attested_log("example.com/attack")


def assert_clean(text: str, lines: int | None = None) -> None:
    assert not UNSAFE.search(text), repr(text)
    if lines is not None:
        assert len(text.splitlines()) == lines, text


def test_releases_escapes_what_a_refused_entry_says(tmp_path: Path,
                                                    attested: AttestedLog) -> None:
    """A refused keyset entry's own app id was printed raw: a newline in it printed a
    line reading "release at entry 9 ... verified" that no check had made."""
    a = attested
    forged = copy.deepcopy(a.keyset_obj)
    forged["app_id"] = HOSTILE
    write_log(tmp_path / "log", a.signer, [*a.entries, keyset_entry.entry(forged)])
    r = verifier("releases", "--log", str(tmp_path / "log"), "--vkey", a.signer.vkey,
                 "--allow-simulated")
    assert r.returncode == 1
    assert_clean(r.stdout)
    assert_clean(r.stderr)
    assert not any(line.lstrip().startswith("release at entry 9")
                   for line in r.stdout.splitlines())
    assert "release at entry 2" in r.stdout and "NOT verified" in r.stdout


def test_proof_escapes_what_a_receipt_says(tmp_path: Path, attested: AttestedLog) -> None:
    """Route, provider and id come from the receipt: printed escaped, one line each."""
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway, route=HOSTILE, provider=HOSTILE)
    entries, cp = logged(tmp_path, a, rec)
    pf = proof_file(tmp_path, entries, 2, cp)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", pf)
    assert r.returncode == 0, r.stderr
    assert_clean(r.stdout)
    assert "\\x1b" in r.stdout  # shown, escaped, not hidden
    assert not any(line.lstrip().startswith("release at entry 9")
                   for line in r.stdout.splitlines())


def test_audit_policy_failure_escapes_the_alert(tmp_path: Path, attested: AttestedLog) -> None:
    """The one-line failure of `audit --policy` quotes an alert reason from the log."""
    a = attested
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow_simulated": True}))
    forged = copy.deepcopy(a.keyset_obj)
    forged["app_id"] = HOSTILE
    write_log(tmp_path / "log", a.signer, [*a.entries, keyset_entry.entry(forged)])
    r = verifier("audit", "--vkey", a.signer.vkey, "--policy", str(policy), "--log",
                 str(tmp_path / "log"))
    assert r.returncode == 1 and "keyset_out_of_policy" in r.stderr
    assert_clean(r.stderr, lines=1)


def test_a_receipt_naming_a_later_keyset_entry_is_refused(tmp_path: Path,
                                                          attested: AttestedLog) -> None:
    """Held: the keyset entry must precede the receipt, even a valid copy of it."""
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway, keyset_index=3)
    entries, cp = logged(tmp_path, a, rec)
    entries = [*entries, keyset_entry.entry(a.keyset_obj)]
    cp = write_log(tmp_path / "log", a.signer, entries)
    pf = proof_file(tmp_path, entries, 2, cp)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", pf)
    assert r.returncode == 1 and "keyset_not_before" in r.stderr


def test_a_keyset_entry_bound_to_another_logs_checkpoint_is_refused(
        tmp_path: Path, attested: AttestedLog) -> None:
    """Held: an attested keyset entry copied from another log names that log's
    checkpoint (and key), which this log's key does not sign."""
    a = attested
    other = attested_log("example.com/other-log")
    rec = make_receipt(other.receipt_key, other.gateway)
    entries = [*a.entries[:1], other.entries[1]]
    entries.append(receipt.entry(rec))
    cp = write_log(tmp_path / "log", a.signer, entries)
    pf = proof_file(tmp_path, entries, 2, cp)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", pf)
    assert r.returncode == 1 and "keyset_entry_invalid" in r.stderr
    assert "checkpoint" in r.stderr


def test_a_receipt_spelled_with_duplicate_members_is_refused(tmp_path: Path,
                                                             attested: AttestedLog) -> None:
    """Held: a log entry with a duplicate `route` (parsers keep the last one) is not the
    signed receipt's RFC 8785 bytes, so no displayed member escapes the signature."""
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway)
    good = receipt.entry(rec)
    dup = good[:-1] + b',"route":{"route_id":"shadow","model":"m","provider":"p"}}'
    entries = [*a.entries, dup]
    cp = write_log(tmp_path / "log", a.signer, entries)
    pf = proof_file(tmp_path, entries, 2, cp)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", pf)
    assert r.returncode == 1 and "receipt_invalid" in r.stderr
    assert "shadow" not in r.stdout


def test_a_keyset_entry_bound_to_a_checkpoint_from_after_it_is_refused(
        tmp_path: Path, attested: AttestedLog) -> None:
    """The nonce proves the quote postdates the checkpoint it names. An entry at index 1
    naming a checkpoint of size 5, signed by the log, names a tree this log did not have
    when the entry was appended (a fork): its freshness proves nothing about this log."""
    a = attested
    future = checkpoint.sign(checkpoint.Checkpoint(a.signer.name, 5, bytes(32)), a.signer)
    short = Path(tempfile.mkdtemp(prefix="pagv-", dir="/tmp"))

    async def fn(client: object, srv: object) -> tuple[object, dict]:
        gk = await keys.load(client, log_vkey=a.signer.vkey)
        return gk, await identity_attestation.build(client, gk, keyset_entry.nonce_for(future))

    try:
        gk, doc = _with_sim(short, fn)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    obj = keyset_entry.build(doc, future, "2026-12-05T00:00:00Z")
    gateway = {k: doc[k] for k in ("app_id", "compose_hash", "keyset_hash")}
    rec = make_receipt(gk.receipt_key, gateway)
    entries = [b"genesis", keyset_entry.entry(obj), receipt.entry(rec)]
    cp = write_log(tmp_path / "log", a.signer, entries)
    pf = proof_file(tmp_path, entries, 2, cp)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", pf)
    assert r.returncode == 1 and "keyset_entry_invalid" in r.stderr, r.stdout + r.stderr
    assert "after" in r.stderr


@pytest.mark.parametrize("member", [b'"n":NaN', b'"n":1e999', b'"n":' + b"9" * 30,
                                    b'"n":"\\ud800"'])
def test_numbers_and_strings_rfc8785_cannot_spell_are_a_one_line_refusal(
        tmp_path: Path, attested: AttestedLog, member: bytes) -> None:
    """Held: a receipt entry with NaN, an infinite or too-large number or a lone surrogate
    has no RFC 8785 bytes, hence no signature that covers it: refused, no traceback."""
    a = attested
    good = receipt.entry(make_receipt(a.receipt_key, a.gateway))
    bad = good[:-1] + b"," + member + b"}"
    entries = [*a.entries, bad]
    cp = write_log(tmp_path / "log", a.signer, entries)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", proof_file(tmp_path, entries, 2, cp))
    assert r.returncode == 1 and "receipt_invalid" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_keyset_entry_bound_to_a_forked_checkpoint_is_refused(
        tmp_path: Path, attested: AttestedLog) -> None:
    """The keyset entry's nonce names a checkpoint of size 1 signed by the log, but of
    another tree than the one the receipt is proven in (entry 0 differs): the freshness
    it claims is in a fork. `proof` checks the named checkpoint is a prefix of the tree."""
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway)
    entries = [b"another genesis", a.entries[1], receipt.entry(rec)]
    cp = write_log(tmp_path / "log", a.signer, entries)
    pf = proof_file(tmp_path, entries, 2, cp)
    r = verifier("proof", "--vkey", a.signer.vkey, "--log", str(tmp_path / "log"),
                 "--allow-simulated", pf)
    assert r.returncode == 1 and "checkpoint_invalid" in r.stderr, r.stdout + r.stderr
    assert "not of this log's tree" in r.stderr


class _Endless(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a body that never ends (1 MiB chunks), counting what it sent."""

    sent = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(4096):  # 4 GiB, if anyone read it all
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_an_endless_source_is_refused_at_the_limit() -> None:
    """`proof URL` read the whole body before checking its size, and `proof /dev/zero`
    read without end: a hostile server or file exhausted memory. Both now stop reading
    one byte past 16 MiB."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SourceError, match="larger than 16 MiB"):
            read_source(f"http://127.0.0.1:{httpd.server_address[1]}/proof")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Endless.sent < 128 << 20
    with pytest.raises(SourceError, match="larger than 16 MiB"):
        read_source("/dev/zero")


def test_receipt_stops_reading_an_endless_gateway() -> None:
    """`verifier receipt` talks to the gateway without a CA check (nothing from it is
    trusted), so anyone on the path can answer; the whole answer was read first."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Endless.sent = 0
    try:
        r = verifier("receipt", "--gateway", f"http://127.0.0.1:{httpd.server_address[1]}",
                     "--request-hash", "ab" * 32)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert r.returncode == 1 and "larger than 16 MiB" in r.stderr, r.stderr
    assert _Endless.sent < 128 << 20


def test_non_ascii_and_surrogate_strings_are_refusals_not_crashes(attested: AttestedLog) -> None:
    """Found by mutating a real attestation document and keyset entry (3,000 each): a
    document `nonce` holding a lone surrogate raised UnicodeEncodeError out of
    `client.attest` (anyone on the path can answer the attestation fetch), and a
    non-ASCII `keyset_hash` in a keyset entry raised TypeError out of `hmac`."""
    a = attested
    nonce = keyset_entry.nonce_for(a.keyset_obj["checkpoint"].encode())
    doc = {**a.keyset_obj["attestation"], "nonce": "\ud800"}
    with pytest.raises(vc.AttestationFailed) as e:
        vc.attest(doc, nonce, vc.Policy(allow_simulated=True), time.time())
    assert e.value.code == "malformed"
    entry = {**a.keyset_obj, "keyset_hash": "é" * 64}
    with pytest.raises(keyset_entry.KeysetEntryError) as e2:
        receipt_check.trusted_keyset(entry, 1, log_verifier=a.signer.verifier(),
                                     policy=receipt_check.KeysetPolicy(allow_simulated=True))
    assert e2.value.code == "keyset_mismatch"


MUTANTS = [None, True, 0, -1, 2**70, 1.5, float("nan"), "", "zz", "00" * 32, "0" * 10_000,
           [], {}, [1], {"a": 1}, "\ud800", "é" * 64]


def _mutate(o: object, rnd: random.Random, depth: int = 0) -> object:
    """`o` with one member deleted, replaced by a hostile value, or mutated inside."""
    if isinstance(o, dict) and o:
        k = rnd.choice(list(o))
        r = rnd.random()
        if r < 0.2:
            del o[k]
        elif r < 0.6 or depth > 3:
            o[k] = rnd.choice(MUTANTS)
        else:
            o[k] = _mutate(o[k], rnd, depth + 1)
        return o
    if isinstance(o, str) and o and rnd.random() < 0.5:
        i = rnd.randrange(len(o))
        return o[:i] + rnd.choice("0fZ\x00é{") + o[i + 1:]
    return rnd.choice(MUTANTS)


def test_mutated_attestations_and_keyset_entries_only_ever_refuse(
        attested: AttestedLog) -> None:
    """Whatever a path attacker does to the attestation document, or a log to a keyset
    entry, the verdict is the module's own refusal, never another exception."""
    a = attested
    nonce = keyset_entry.nonce_for(a.keyset_obj["checkpoint"].encode())
    policy = receipt_check.KeysetPolicy(allow_simulated=True)
    rnd = random.Random(7)
    for _ in range(600):
        doc = copy.deepcopy(a.keyset_obj["attestation"])
        for _ in range(rnd.randint(1, 3)):
            doc = _mutate(doc, rnd)
        with contextlib.suppress(vc.VerificationError):
            vc.attest(doc, nonce, vc.Policy(allow_simulated=True), time.time())
        entry = copy.deepcopy(a.keyset_obj)
        for _ in range(rnd.randint(1, 3)):
            entry = _mutate(entry, rnd)
        with contextlib.suppress(keyset_entry.KeysetEntryError):
            receipt_check.trusted_keyset(entry, 1, log_verifier=a.signer.verifier(),
                                         policy=policy)
