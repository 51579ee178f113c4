"""The log counts and serves only witness cosignatures that verify (issue 13, item 5),
and no witness's HTTP answer can crash it, outlast a round or fill its memory.

Fake witnesses are small HTTP servers on loopback that answer whatever a test
tells them to; raw witnesses (`RawWitness`) send exact bytes, including broken
HTTP, and count connections. The log runs in-process over SQLite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_gateway_fakes import tls_server_context
from tests.test_tlog_crash import _run
from tests.tlogutil import free_port
from tlog import checkpoint, keys
from tlog.sequencer import AppendError, Log
from tlog.sqlite_store import SQLiteStore
from tlog.witnessing import MAX_ANSWER, Endpoint, WitnessPool, endpoint
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



# -- hostile witnesses at the HTTP level (tlog.http1 under the pool) ----------------------


@dataclass
class Raw:
    """What a raw witness sends for one request: these pieces (a generator may sleep or
    never end), then it closes the connection, goes silent, or reads the next request."""

    pieces: Iterable[bytes] = ()
    close: bool = False
    hang: bool = False


def ok(line: bytes, *extra: bytes) -> Raw:
    """An HTTP/1.1 200 keep-alive answer carrying `line`."""
    return Raw([b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%b"
                % (b"".join(extra), len(line), line)])


class RawWitness:
    """A loopback TCP server that reads add-checkpoint requests (head, Content-Length body)
    and answers each with the exact bytes a test gives; it counts connections and
    requests, notes when a client hung up while it was still sending, and sets
    `answered` once it sent a whole answer or saw the client hang up."""

    def __init__(self, reply: Callable[[bytes], Raw],
                 tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.accepted = 0
        self.requests: list[bytes] = []
        self.hung_up = 0
        self.answered = threading.Event()
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(None)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            buf = b""
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                self.requests.append(body)
                raw = self.reply(body)
                try:
                    for piece in raw.pieces:
                        if self.stop.is_set():
                            return
                        conn.sendall(piece)
                except OSError:
                    self.hung_up += 1
                    self.answered.set()
                    return
                self.answered.set()
                if raw.hang:
                    self.stop.wait()
                if raw.close:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def raws() -> Iterator[Callable[..., RawWitness]]:
    made: list[RawWitness] = []

    def make(reply: Callable[[bytes], Raw], tls: ssl.SSLContext | None = None) -> RawWitness:
        made.append(RawWitness(reply, tls))
        return made[-1]

    yield make
    for w in made:
        w.close()


def cosigning(signer: cosignature.CosignatureSigner) -> Callable[[bytes], Raw]:
    """An honest raw witness: a keep-alive 200 with its cosignature."""
    return lambda body: ok(cosignature.cosign(request.parse(body).checkpoint, signer).line())


def rounds(tmp_path, urls: list[str], verifiers: list[cosignature.CosignatureVerifier],
           sizes: list[int], timeout: float = 3) -> tuple[WitnessPool, list[list]]:
    """One cosigning round per size (signed checkpoints of one log) on one pool; the pool
    and each round's cosignatures."""
    signer = keys.load_signer(tmp_path / "log")
    pool = WitnessPool(urls, verifiers, timeout=timeout)

    async def go() -> list[list]:
        await pool.start()
        try:
            return [await pool.cosign(
                checkpoint.sign(checkpoint.Checkpoint(signer.name, n, bytes([n]) * 32), signer),
                n, lambda old, new: []) for n in sizes]
        finally:
            await pool.close()

    return pool, asyncio.run(go())


def endless_chunks() -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    while True:
        yield b"4000\r\n" + b"\xe2\x80\x94" * 5461 + b"x\r\n"


def over_by_one() -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER + 1)
    yield b"x" * (MAX_ANSWER + 1)


@pytest.mark.parametrize("answer", [endless_chunks, over_by_one])
def test_an_endless_answer_is_a_bad_answer_and_the_log_keeps_going(tmp_path, fakes, raws,
                                                                    caplog, answer):
    """An answer is read up to MAX_ANSWER (64 KiB), not up to the HTTP client's 64 MiB
    default: that witness counts "bad_answer", the honest one still meets the quorum.
    (The honest witness answers after the other, so the round does not end, and the log
    close, while the oversized answer is still on its way: that would count "timeout".)"""
    big = cosignature.generate_signer("big.example")
    w = cosignature.generate_signer("w.example")
    endless = raws(lambda _: Raw(answer(), hang=True))

    def after_endless(body: bytes) -> tuple[int, bytes]:
        endless.answered.wait(10)
        time.sleep(0.2)
        return honest(w)(body)

    log, results = run_log(tmp_path, [endless.url, fakes(after_endless)],
                           [big.verifier(), w.verifier()], 1, [b"a", b"b"])
    assert all(not isinstance(r, Exception) for r in results)
    assert served_cosigners(log, [big.verifier(), w.verifier()]) == [w.name]
    failures = log.witnesses.status[endless.url].failures
    assert set(failures) == {"bad_answer"} and failures["bad_answer"] >= 1
    log.store.close()
    assert endless.requests
    assert f"answered over {MAX_ANSWER} bytes" in caplog.text


def test_a_witness_closing_mid_answer_is_unreachable(tmp_path, raws):
    w = cosignature.generate_signer("w.example")
    cut = raws(lambda _: Raw([b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n\xe2\x80\x94 w"],
                             close=True))
    pool, got = rounds(tmp_path, [cut.url], [w.verifier()], [1])
    assert got == [[]]
    assert pool.status[cut.url].failures == {"unreachable": 1}


def drip() -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nX-Slow: "
    while True:
        time.sleep(0.05)
        yield b"a"


@pytest.mark.parametrize("answer", [Raw(hang=True), Raw(drip())], ids=["silent", "drip"])
def test_a_witness_that_never_answers_times_out_by_the_round_deadline(tmp_path, raws, answer):
    """Silent, or dripping a header byte at a time: "timeout" once the one round deadline
    passed, while the honest witness's cosignature is kept."""
    w, slow = cosignature.generate_signer("w.example"), cosignature.generate_signer("s.example")
    stuck, good = raws(lambda _: answer), raws(cosigning(w))
    start = time.monotonic()
    pool, got = rounds(tmp_path, [stuck.url, good.url], [w.verifier(), slow.verifier()], [1],
                       timeout=1)
    assert time.monotonic() - start < 15  # a generous bound: the deadline is 1 s
    assert [s.name for s in got[0]] == [w.name]
    assert pool.status[stuck.url].failures == {"timeout": 1}
    assert stuck.requests


@pytest.mark.parametrize("garbage", [
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
], ids=["not-http", "bad-status", "two-lengths", "length-and-chunked", "gzip", "http2"])
def test_a_malformed_http_answer_is_a_failure(tmp_path, raws, garbage):
    """The witness then goes silent: only a parser that refused the bytes ends the request
    before the deadline ("unreachable", not "timeout")."""
    w = cosignature.generate_signer("w.example")
    bad = raws(lambda _: Raw([garbage], hang=True))
    pool, got = rounds(tmp_path, [bad.url], [w.verifier()], [1], timeout=10)
    assert got == [[]]
    assert pool.status[bad.url].failures == {"unreachable": 1}


@pytest.mark.parametrize(("extra", "connections"), [(b"", 1), (b"Connection: close\r\n", 3)],
                         ids=["keep-alive", "close"])
def test_keep_alive_connections_are_reused_across_rounds(tmp_path, raws, extra, connections):
    """Three rounds to one witness take one connection; a witness that closes after each
    answer gets a fresh one per round."""
    w = cosignature.generate_signer("w.example")

    def answer(body: bytes) -> Raw:
        line = cosignature.cosign(request.parse(body).checkpoint, w).line()
        return Raw([*ok(line, extra).pieces], close=bool(extra))

    witness = raws(answer)
    pool, got = rounds(tmp_path, [witness.url], [w.verifier()], [1, 2, 3])
    assert [[s.name for s in sigs] for sigs in got] == [[w.name]] * 3
    assert len(witness.requests) == 3
    assert witness.accepted == connections
    assert pool.status[witness.url].size == 3


def test_a_409_is_retried_from_the_size_it_reports_on_the_same_connection(tmp_path, raws):
    w = cosignature.generate_signer("w.example")

    def answer(body: bytes) -> Raw:
        req = request.parse(body)
        if req.old_size != 2:
            return Raw([b"HTTP/1.1 409 Conflict\r\nContent-Type: text/x.tlog.size\r\n"
                        b"Content-Length: 2\r\n\r\n2\n"])
        return ok(cosignature.cosign(req.checkpoint, w).line())

    witness = raws(answer)
    pool, got = rounds(tmp_path, [witness.url], [w.verifier()], [3])
    assert [s.name for s in got[0]] == [w.name]
    assert [request.parse(b).old_size for b in witness.requests] == [0, 2]
    assert witness.accepted == 1
    assert pool.status[witness.url].size == 3


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_an_https_witness_is_reached_only_with_a_verified_certificate(tmp_path, raws,
                                                                       monkeypatch, trusted):
    w = cosignature.generate_signer("w.example")
    ctx, _ = tls_server_context(tmp_path, ip="127.0.0.1")
    crt = tmp_path / "tls.crt"
    if trusted:  # the default SSL context's trust store (OpenSSL reads it when made)
        monkeypatch.setenv("SSL_CERT_FILE", str(crt))
    witness = raws(cosigning(w), tls=ctx)
    assert witness.url.startswith("https://")
    pool, got = rounds(tmp_path, [witness.url], [w.verifier()], [1, 2])
    if trusted:
        assert [[s.name for s in sigs] for sigs in got] == [[w.name]] * 2
        assert witness.accepted == 1
    else:
        assert got == [[], []]
        assert pool.status[witness.url].failures == {"unreachable": 2}
        assert witness.requests == []


def test_witness_urls_become_add_checkpoint_endpoints():
    assert endpoint("http://[::1]:8080/w/") == Endpoint(
        ("::1", 8080, False, None), b"POST /w/add-checkpoint HTTP/1.1\r\nHost: [::1]:8080\r\n")
    assert endpoint("https://Witness.example") == Endpoint(
        ("witness.example", 443, True, None),
        b"POST /add-checkpoint HTTP/1.1\r\nHost: Witness.example\r\n")
    assert endpoint("http://w.example").target == ("w.example", 80, False, None)


BAD_URLS = ["ftp://w.example", "w.example:8080", "http://", "http://:8080",
            "http://w.example:99999", "http://w.example:port", "http://w.example:0",
            "http://user:pw@w.example", "http://w.example/?q", "http://w.example/#f",
            "http://w.example/a b", "http://w.example/\u00e9", "http://[::1"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_the_pool_refuses_a_malformed_witness_url(url):
    w = cosignature.generate_signer("w.example").verifier()
    with pytest.raises(ValueError, match="bad witness URL"):
        WitnessPool([url], [w])


@pytest.mark.parametrize("url", ["ftp://w.example", "http://w.example:99999", "http://"])
def test_serve_refuses_a_malformed_witness_url(tmp_path, url):
    """Exit 2 with one line naming the URL, though every other flag is right."""
    vkey = cosignature.generate_signer("w.example").vkey
    r = subprocess.run([sys.executable, "-m", "tlog", "serve", "--data", str(tmp_path / "d"),
                        "--listen", f"127.0.0.1:{free_port()}", "--witness", url,
                        "--witness-vkey", vkey, "--quorum", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bad witness URL" in r.stderr and repr(url) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "d" / "log.db").exists()
