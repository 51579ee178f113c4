"""`python -m verifier` against logs and proofs we did not write, and tampered copies."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.attested_log import AttestedLog, attested_log, make_receipt, write_log
from tlog import note, tiles
from verifier import receipt


def verifier(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verifier", *args], capture_output=True,
                          input=stdin, timeout=120)


@pytest.fixture
def serve():
    """Serve a directory over HTTP on loopback; yields a function dir -> base URL."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_Quiet, directory=str(directory))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_rekor_v2_cases(testdata):
    d = testdata / "vectors" / "rekor-v2"
    cases = json.loads((d / "expected.json").read_text())["cases"]
    for c in cases:
        args = [c["command"], "--vkey", str(d / c["vkey"])]
        for w in c["witness"]:
            args += ["--witness", str(d / w)]
        if c["quorum"] is not None:
            args += ["--quorum", str(c["quorum"])]
        r = verifier(*args, str(d / c["src"]))
        assert (r.returncode == 0) == (c["expect"] == "ok"), (c, r.stderr)
        if r.returncode:
            assert len(r.stderr.decode().strip().splitlines()) == 1  # a one-line reason


def test_checkpoint_note_vectors(testdata):
    d = testdata / "vectors" / "notes"
    for c in json.loads((d / "expected.json").read_text())["cases"]:
        if c.get("kind") != "checkpoint" and not c["file"].endswith(".checkpoint"):
            continue
        if not c["vkeys"]:
            continue
        r = verifier("checkpoint", "--vkey", str(d / c["vkeys"][0]), str(d / c["file"]))
        assert (r.returncode == 0) == (c["expect"] == "ok"), (c, r.stderr)


def test_stdin_source_and_json(testdata):
    d = testdata / "vectors" / "rekor-v2"
    r = verifier("checkpoint", "--json", "--vkey", str(d / "keys/log2025-alpha1.vkey"), "-",
                 stdin=(d / "checkpoints/log2025-alpha1-646.checkpoint").read_bytes())
    assert r.returncode == 0 and json.loads(r.stdout)["size"] == 646


def _snapshot(log: Path, n: int, out: Path) -> Path:
    """The tessera log as it was at size n (it keeps every checkpoint and partial tile)."""
    out.mkdir()
    (out / "checkpoint").write_bytes((log / f"checkpoint.{n}").read_bytes())
    (out / "tile").symlink_to(log / "tile")
    return out


def test_audit_tessera_log_over_http_with_state(testdata, tmp_path, serve):
    log = testdata / "tessera-log" / "log"
    vkey = str(testdata / "tessera-log" / "log.vkey")
    state = tmp_path / "state.json"
    for n in (1, 2, 7, 8, 15):
        url = serve(_snapshot(log, n, tmp_path / f"s{n}"))
        r = verifier("audit", "--json", "--log", url, "--vkey", vkey, "--state", str(state))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["size"] == n
    # the fork (same key, other history) against the saved state: split view
    fork = testdata / "vectors" / "tessera-fork" / "log"
    r = verifier("audit", "--log", serve(fork), "--vkey", vkey, "--state", str(state))
    assert r.returncode == 1 and b"split view" in r.stderr
    # and an older checkpoint after a newer one: the log shrank
    r = verifier("audit", "--log", serve(_snapshot(log, 8, tmp_path / "old")), "--vkey", vkey,
                 "--state", str(state))
    assert r.returncode == 1 and b"shrank" in r.stderr


@pytest.mark.parametrize(
    ("target", "reason"),
    [("tile/0/000.p/15", b"does not match its hash"),
     ("tile/entries/000.p/15", b"does not match its hash"),
     ("checkpoint", b"checkpoint")],
)
def test_audit_detects_one_flipped_byte(testdata, tmp_path, target, reason):
    log = tmp_path / "log"
    shutil.copytree(testdata / "tessera-log" / "log", log)
    p = log / target
    data = bytearray(p.read_bytes())
    data[40 if target != "checkpoint" else 30] ^= 1
    p.write_bytes(bytes(data))
    r = verifier("audit", "--log", str(log), "--vkey", str(testdata / "tessera-log" / "log.vkey"))
    assert r.returncode == 1 and reason in r.stderr, r.stderr


def test_audit_multi_level_log(tmp_path):
    signer = note.generate_signer("example.com/big")
    entries = [b"e%d" % i for i in range(256 * 256 + 300)]
    write_log(tmp_path, signer, entries)
    r = verifier("audit", "--log", str(tmp_path), "--vkey", signer.vkey)
    assert r.returncode == 0, r.stderr
    # a level-1 tile that does not hold the root of the level-0 tile below it
    p = tmp_path / "tile/1/000"
    data = bytearray(p.read_bytes())
    data[33] ^= 1
    p.write_bytes(bytes(data))
    r = verifier("audit", "--log", str(tmp_path), "--vkey", signer.vkey)
    assert r.returncode == 1 and b"tile/1/000: hash 1" in r.stderr


def test_audit_log_built_by_go(tmp_path):
    """A static log whose tiles and note Go's x/mod code made."""
    from tests.test_interop_go import GOPATH, SRC

    go = shutil.which("go")
    if go is None or not GOPATH.is_dir():
        pytest.skip("GO NOT INSTALLED: cannot build the Go-made log (scripts/setup.sh installs it)")
    env = {"GOPATH": str(GOPATH), "GO111MODULE": "off", "GOCACHE": str(tmp_path / "c"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run([go, "build", "-o", str(tmp_path / "g"), str(SRC)], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    subprocess.run([str(tmp_path / "g"), "make", str(tmp_path)], check=True, capture_output=True)
    made = json.loads((tmp_path / "go.json").read_text())
    log = tmp_path / "log"
    entries = [base64.b64decode(e) for e in made["entries"]]
    for path, data in made["tiles"].items():
        t = tiles.parse_path(path)
        final = tiles.tiles_for_size(len(entries))
        if t in final:
            (log / path).parent.mkdir(parents=True, exist_ok=True)
            (log / path).write_bytes(base64.b64decode(data))
    for b in tiles.bundles_for_size(len(entries)):
        (log / str(b)).parent.mkdir(parents=True, exist_ok=True)
        (log / str(b)).write_bytes(tiles.encode_bundle(entries[b.index * 256 : b.index * 256 + b.width]))
    (log / "checkpoint").write_bytes(base64.b64decode(made["note"]))
    r = verifier("audit", "--log", str(log), "--vkey", made["vkey"])
    assert r.returncode == 0, r.stderr


def _receipt(key: Ed25519PrivateKey, route: str = "demo", provider: str = "demo",
             verified: bool = True, request: bytes = b"r") -> bytes:
    def h(data: bytes) -> str:
        return receipt.digest(b"s" * 32, data)

    body = {"v": receipt.VERSION, "id": "r-" + h(request)[:8], "time": "2026-11-24T00:00:00Z",
            "gateway": {"app_id": "a", "compose_hash": h(b"c"), "keyset_hash": h(b"k")},
            "request_hash": h(request), "forwarded_hash": h(request),
            "route": {"route_id": route, "model": "m", "provider": provider, "upstream_model": "u"},
            "upstream": {"verified": verified, "evidence": "dstack", "binding": "x",
                         "lease_id": "l", "verified_at": "t", "expires_at": "t"},
            "provider_request_hash": h(b"p"), "provider_response_hash": h(b"q"),
            "response_hash": h(b"s"), "e2ee": {"mode": "none"}, "keyset_index": 0}
    return receipt.entry(receipt.sign(body, key))


@pytest.fixture(scope="module")
def attested() -> AttestedLog:
    return attested_log("example.com/receipts")


def test_monitor_flags_policy_violations(tmp_path, attested):
    a = attested
    good_key, rogue_key = a.receipt_key, Ed25519PrivateKey.generate()

    def rec(key, **kw) -> bytes:
        return receipt.entry(make_receipt(key, a.gateway, **kw))

    entries = [*a.entries,
               rec(good_key, request=b"ok"),
               rec(good_key, route="shadow", request=b"forbidden"),
               rec(good_key, verified=False, request=b"unverified"),
               rec(rogue_key, request=b"rogue"),
               b"not a receipt"]
    signer = a.signer
    write_log(tmp_path / "log", signer, entries)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({
        "allow_simulated": True, "app_id": a.gateway["app_id"],
        "allowed_routes": ["demo"], "allowed_providers": ["demo"], "require_verified": True}))
    r = verifier("monitor", "--once", "--log", str(tmp_path / "log"), "--vkey", signer.vkey,
                 "--policy", str(policy), "--state", str(tmp_path / "m.json"))
    alerts = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert r.returncode == 1
    assert sorted((a["alert"], a["index"]) for a in alerts) == [
        ("forbidden_route", 3), ("unattested_receipt", 5), ("unverified_upstream", 4)]
    # a later poll of the same log raises nothing new
    r = verifier("monitor", "--once", "--log", str(tmp_path / "log"), "--vkey", signer.vkey,
                 "--policy", str(policy), "--state", str(tmp_path / "m.json"))
    assert r.returncode == 0 and r.stdout == b""
    # a split view: the same key signs another history of the same size
    other = [*entries[:3], rec(good_key, request=b"rewritten"), *entries[4:]]
    write_log(tmp_path / "fork", signer, other + [b"grown"])
    r = verifier("monitor", "--once", "--log", str(tmp_path / "fork"), "--vkey", signer.vkey,
                 "--policy", str(policy), "--state", str(tmp_path / "m.json"))
    assert r.returncode == 1 and json.loads(r.stdout.splitlines()[0])["alert"] == "split_view"
