"""The log counts and serves only witness cosignatures that verify (issue 13, item 5).

Fake witnesses are small HTTP servers on loopback that answer whatever a test
tells them to; the log runs in-process over SQLite.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_tlog_crash import _run
from tests.tlogutil import free_port
from tlog import checkpoint, keys
from tlog.sequencer import AppendError, Log
from tlog.sqlite_store import SQLiteStore
from tlog.witnessing import WitnessPool
from witness import cosignature, request

Answer = Callable[[bytes], tuple[int, bytes]]
"""A fake witness: request body -> (status, response body)."""


def serve_fake(answer: Answer) -> tuple[str, ThreadingHTTPServer]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, out = answer(body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture
def fakes() -> Iterator[Callable[[Answer], str]]:
    servers: list[ThreadingHTTPServer] = []

    def make(answer: Answer) -> str:
        url, server = serve_fake(answer)
        servers.append(server)
        return url

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def honest(signer: cosignature.CosignatureSigner) -> Answer:
    """A witness that cosigns whatever checkpoint it is sent (no state: enough here)."""
    return lambda body: (200, cosignature.cosign(request.parse(body).checkpoint, signer).line())


def forger(name: str, key_id: bytes) -> Answer:
    """A fake witness: 200 with a random signature under someone else's key name and ID."""
    def answer(_: bytes) -> tuple[int, bytes]:
        raw = base64.b64encode(key_id + (1).to_bytes(8, "big") + os.urandom(64)).decode()
        return 200, f"\u2014 {name} {raw}\n".encode()
    return answer


def junk(_: bytes) -> tuple[int, bytes]:
    return 200, b"cosigned, trust me\n"


def run_log(tmp_path, urls: list[str], vkeys: list[cosignature.CosignatureVerifier],
            quorum: int, entries: list[bytes]) -> tuple[Log, list]:
    signer = keys.load_signer(tmp_path / "log")
    store = SQLiteStore(tmp_path / "log" / "log.db")
    log = Log(store, signer, witnesses=WitnessPool(urls, vkeys, quorum=quorum, timeout=3))
    results = _run(log, entries)
    return log, results


def served_cosigners(log: Log, witnesses: list[cosignature.CosignatureVerifier]) -> list[str]:
    """Names on the served checkpoint; opening it also fails on any bad known-key line."""
    _, n = checkpoint.open(log.served.note, log.signer.verifier(), witnesses)
    assert not n.unverified, "the log serves a signature line it could not verify"
    return sorted(s.name for s in n.sigs if s.name != log.signer.name)


def test_junk_answer_does_not_meet_quorum(tmp_path, fakes):
    w = cosignature.generate_signer("w.example")
    log, results = run_log(tmp_path, [fakes(junk)], [w.verifier()], 1, [b"a", b"b"])
    assert all(isinstance(r, AppendError) for r in results)
    assert served_cosigners(log, [w.verifier()]) == []
    assert log.witnesses.status[log.witnesses.urls[0]].failures == {"bad_answer": 1}
    log.store.close()


def test_forged_line_under_honest_key_is_neither_counted_nor_served(tmp_path, fakes):
    w = cosignature.generate_signer("w.example")
    forged = fakes(forger(w.name, w.key_id))
    log, results = run_log(tmp_path, [forged], [w.verifier()], 1, [b"a"])
    assert all(isinstance(r, AppendError) for r in results)
    assert served_cosigners(log, [w.verifier()]) == []
    log.store.close()


def test_forger_beside_honest_witness_cannot_poison_the_checkpoint(tmp_path, fakes):
    """The honest line is served; the forged one under the same key never is, so a
    verifier trusting the honest witness accepts every checkpoint the log serves."""
    w = cosignature.generate_signer("w.example")
    urls = [fakes(forger(w.name, w.key_id)), fakes(honest(w))]
    log, results = run_log(tmp_path, urls, [w.verifier()], 1, [b"a%d" % i for i in range(20)])
    assert all(not isinstance(r, Exception) for r in results)
    for r in results:
        cosignature.verify_witnessed(r.checkpoint, log.signer.verifier(), [w.verifier()], 1)
    assert served_cosigners(log, [w.verifier()]) == [w.name]
    log.store.close()


def test_one_witness_key_behind_two_urls_counts_once(tmp_path, fakes):
    w = cosignature.generate_signer("w.example")
    other = cosignature.generate_signer("x.example")
    urls = [fakes(honest(w)), fakes(honest(w))]
    log, results = run_log(tmp_path, urls, [w.verifier(), other.verifier()], 2, [b"a"])
    assert all(isinstance(r, AppendError) for r in results)
    assert served_cosigners(log, [w.verifier()]) == []  # quorum failed: nothing newer served
    log.store.close()


def test_cosignature_from_unconfigured_key_is_dropped(tmp_path, fakes):
    w = cosignature.generate_signer("w.example")
    stranger = cosignature.generate_signer("stranger.example")
    urls = [fakes(honest(stranger)), fakes(honest(w))]
    log, results = run_log(tmp_path, urls, [w.verifier()], 1, [b"a", b"b"])
    assert all(not isinstance(r, Exception) for r in results)
    assert b"stranger.example" not in log.served.note
    assert served_cosigners(log, [w.verifier()]) == [w.name]
    log.store.close()


def test_two_distinct_witnesses_meet_quorum_two(tmp_path, fakes):
    a, b = cosignature.generate_signer("a.example"), cosignature.generate_signer("b.example")
    urls = [fakes(honest(a)), fakes(honest(b))]
    log, results = run_log(tmp_path, urls, [a.verifier(), b.verifier()], 2, [b"a"])
    assert all(not isinstance(r, Exception) for r in results)
    w = cosignature.verify_witnessed(results[0].checkpoint, log.signer.verifier(),
                                     [a.verifier(), b.verifier()], 2)
    assert w.cosigners == ("a.example", "b.example")
    log.store.close()


def test_junk_lines_stored_by_an_older_log_are_not_served(tmp_path):
    """A data dir written before cosignatures were checked: the junk line is dropped on load."""
    w = cosignature.generate_signer("w.example")
    signer = keys.load_signer(tmp_path / "log")
    store = SQLiteStore(tmp_path / "log" / "log.db")
    _run(Log(store, signer), [b"a"])
    head = store.head()
    raw = base64.b64encode(w.key_id + (1).to_bytes(8, "big") + bytes(64)).decode()
    store.update_note(head.size, head.note + f"\u2014 {w.name} {raw}\n".encode())
    log = Log(store, signer, witnesses=WitnessPool([], [w.verifier()]))
    assert served_cosigners(log, [w.verifier()]) == []
    store.close()


def test_pool_refuses_quorum_above_distinct_keys():
    w = cosignature.generate_signer("w.example").verifier()
    with pytest.raises(ValueError, match="quorum 2"):
        WitnessPool(["http://a", "http://b"], [w, w], quorum=2)


@pytest.mark.parametrize(("flags", "says"), [
    (["--witness", "http://127.0.0.1:9"], "--witness needs"),
    (["--witness", "http://127.0.0.1:9", "--quorum", "1"], "--quorum 1"),
    (["--witness", "http://127.0.0.1:9", "--witness-vkey", "W", "--quorum", "2"], "--quorum 2"),
    (["--witness", "http://127.0.0.1:9", "--witness-vkey", "nonsense"], "bad --witness-vkey"),
    (["--witness-vkey", "W", "--quorum", "1"], "--witness URLs"),
])
def test_serve_refuses_an_unreachable_quorum(tmp_path, flags, says):
    vkey = cosignature.generate_signer("w.example").vkey
    argv = [a.replace("W", vkey) if a == "W" else a for a in flags]
    r = subprocess.run([sys.executable, "-m", "tlog", "serve", "--data", str(tmp_path / "d"),
                        "--listen", f"127.0.0.1:{free_port()}", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

