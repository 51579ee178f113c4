"""Witness faults (issue 17): one of two witnesses down, slow or answering garbage, and
the witness's own state database failing.

Two real witnesses (`python -m witness serve`) sit behind proxies the test can
break; the log (`python -m tlog serve`) asks both with a 1 s witness timeout.
With quorum 1 of 2 appends go on; with quorum 2 of 2 they get a clean 503
`quorum_not_reached` and stay durable. Either way a watcher polling GET
/checkpoint throughout never sees a checkpoint below the quorum or a line it
cannot verify, and once the witness is back the log catches up by itself:
the newest head ends up cosigned by both, with no further append.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.test_tlog_faults import fill, small_fs  # noqa: F401 - the tmpfs fixture
from tests.tlogutil import free_port, start, start_tlog, stop
from tlog import checkpoint, keys, merkle, note
from witness import cosignature, request
from witness.server import Witness, WitnessApp
from witness.state import State

WITNESS_TIMEOUT = 1.0
SLOW = 2.5
"""How long a slow witness takes: well past the log's witness timeout."""


class FaultProxy:
    """A witness URL in front of a real witness; `mode` makes it ok, down (connection
    refused), slow (answers after SLOW seconds) or garbage (200 with junk)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.mode = "ok"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.mode == "garbage":
                    status, ctype, out = 200, "text/plain", b"\xff\x00 not a cosignature\n"
                else:
                    if proxy.mode == "slow":
                        time.sleep(SLOW)
                    r = httpx.post(proxy.target + self.path, content=body, timeout=10)
                    status, ctype, out = (r.status_code, r.headers.get("content-type", ""),
                                          r.content)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set(self, mode: str) -> None:
        if mode == "down":
            self.down()
        elif self._server is None:
            self.up()
        self.mode = mode


class Stack:
    """A log and two witnesses behind fault proxies, all real processes."""

    def __init__(self, tmp_path: Path, quorum: int) -> None:
        self.procs: list[subprocess.Popen] = []
        data = tmp_path / "log"
        self.signer = keys.load_signer(data)
        self.proxies: list[FaultProxy] = []
        vkeys: list[str] = []
        for name in ("a", "b"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            wd = tmp_path / f"w{name}"
            self.procs.append(start("witness", "serve", "--data", str(wd), "--listen",
                                    f"127.0.0.1:{port}", "--name", f"{name}.example",
                                    "--log", f"{self.signer.name}={self.signer.vkey}",
                                    ready=url + "/"))
            self.proxies.append(FaultProxy(url))
            vkeys.append((wd / "witness.vkey").read_text().strip())
        self.witnesses = cosignature.parse_vkeys(vkeys)
        self.data = data
        self.flags = [*sum([["--witness", p.url, "--witness-vkey", v]
                            for p, v in zip(self.proxies, vkeys, strict=True)], []),
                      "--quorum", str(quorum), "--witness-timeout", str(WITNESS_TIMEOUT)]
        proc, self.url = start_tlog(data, *self.flags)
        self.procs.append(proc)
        self.auth = {"Authorization": f"Bearer {(data / 'append.token').read_text().strip()}"}
        self.quorum = quorum

    def add_all(self, entries: list[bytes]) -> list[httpx.Response]:
        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as c:
                return list(await asyncio.gather(*(
                    c.post(f"{self.url}/add", content=e, headers=self.auth) for e in entries)))
        return asyncio.run(go())

    def checkpoint(self) -> cosignature.Witnessed:
        """GET /checkpoint, opened: it must meet the quorum and carry no bad line."""
        n = httpx.get(f"{self.url}/checkpoint").content
        w = cosignature.verify_witnessed(n, self.signer.verifier(), self.witnesses,
                                         self.quorum)
        assert not w.note.unverified, "a signature line the log could not have verified"
        return w

    def restart_log(self) -> None:
        stop(self.procs.pop())
        proc, self.url = start_tlog(self.data, *self.flags)
        self.procs.append(proc)

    def close(self) -> None:
        for p in self.proxies:
            p.down()
        for p in self.procs:
            stop(p)


@contextlib.contextmanager
def watching(stack: Stack) -> Iterator[list[bytes]]:
    """Poll GET /checkpoint until the block ends; every checkpoint served must meet the
    quorum (a violation is raised at the end). Yields the distinct notes seen."""
    seen: list[bytes] = []
    problems: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                seen_note = httpx.get(f"{stack.url}/checkpoint", timeout=5).content
                cosignature.verify_witnessed(seen_note, stack.signer.verifier(),
                                             stack.witnesses, stack.quorum)
                if seen_note not in seen:
                    seen.append(seen_note)
            except Exception as e:  # noqa: BLE001 - reported after the block
                problems.append(f"{type(e).__name__}: {e}")
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        done.set()
        t.join(10)
    assert not problems, problems[:3]


def failures(stack: Stack, url: str) -> dict[str, float]:
    """The log's witness failure counters for one witness URL, by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{stack.url}/metrics").text
    return {s.labels["reason"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "tlog_witness_failures_total"
            and s.labels["witness"] == url}


REASON = {"down": "unreachable", "slow": "timeout", "garbage": "bad_answer"}


@pytest.mark.parametrize("mode", ["down", "slow", "garbage"])
@pytest.mark.parametrize("quorum", [1, 2])
def test_one_of_two_witnesses_fails_then_returns(tmp_path, quorum, mode):
    stack = Stack(tmp_path, quorum)
    try:
        first = [b"before %d" % i for i in range(3)]
        assert [r.status_code for r in stack.add_all(first)] == [200] * 3
        good, bad = stack.proxies
        with watching(stack) as seen:
            before = stack.checkpoint()
            bad.set(mode)
            during = [b"during %d" % i for i in range(3)]
            answers = stack.add_all(during)
            if quorum == 1:  # the other witness is enough
                for r in answers:
                    assert r.status_code == 200, r.text
                    w = cosignature.verify_witnessed(r.json()["checkpoint"].encode(),
                                                     stack.signer.verifier(), stack.witnesses, 1)
                    assert w.cosigners == ("a.example",)
            else:  # refused cleanly, nothing below quorum served
                for r in answers:
                    assert r.status_code == 503, r.text
                    assert r.json()["code"] == "quorum_not_reached"
                    assert r.headers["retry-after"] == "1"
                assert stack.checkpoint().checkpoint == before.checkpoint
            # counted once the round's deadline passed (with quorum 1, after the answer)
            deadline = time.monotonic() + 10
            while failures(stack, bad.url).get(REASON[mode], 0) < 1:
                assert time.monotonic() < deadline, failures(stack, bad.url)
                time.sleep(0.1)
            bad.set("ok")
            # the log catches up by itself: no append needed
            deadline = time.monotonic() + 30
            while True:
                now = stack.checkpoint()
                if now.checkpoint.size == 6 and len(now.cosigners) == 2:
                    break
                assert time.monotonic() < deadline, f"never caught up: {now.checkpoint}"
                time.sleep(0.1)
            again = stack.add_all(during)  # the refused ones, sent again: each logged once
            assert sorted(r.json()["index"] for r in again) == [3, 4, 5]
            assert stack.add_all([b"after"])[0].json()["index"] == 6
            final = stack.checkpoint()
        assert len(seen) >= 2
        leaves = tiles_of(stack, final.checkpoint.size)
        assert sorted(leaves) == sorted([*first, *during, b"after"])
        hashes = [merkle.leaf_hash(e) for e in leaves]
        assert merkle.root(hashes) == final.checkpoint.root_hash
        for n in seen:  # every checkpoint served is consistent with the final one
            cp = checkpoint.parse(note.split(n)[0])
            r = httpx.get(f"{stack.url}/consistency",
                          params={"old": cp.size, "new": final.checkpoint.size})
            merkle.verify_consistency(cp.size, final.checkpoint.size,
                                      [base64.b64decode(h) for h in r.json()["proof"]],
                                      cp.root_hash, final.checkpoint.root_hash)
    finally:
        stack.close()


def test_restart_while_the_quorum_is_unmet_serves_the_last_witnessed_checkpoint(tmp_path):
    """Quorum 2, one witness down, appends refused but durable: a restarted log serves the
    checkpoint that last met the quorum (never the newer, unwitnessed head), then
    catches up when the witness returns."""
    stack = Stack(tmp_path, 2)
    try:
        assert [r.status_code for r in stack.add_all([b"a", b"b"])] == [200, 200]
        witnessed = stack.checkpoint().checkpoint
        stack.proxies[1].set("down")
        assert [r.status_code for r in stack.add_all([b"c"])] == [503]
        stack.restart_log()
        with watching(stack):
            assert stack.checkpoint().checkpoint == witnessed
            stack.proxies[1].set("ok")
            deadline = time.monotonic() + 30
            while stack.checkpoint().checkpoint.size != 3:
                assert time.monotonic() < deadline, "never caught up after the restart"
                time.sleep(0.1)
        assert stack.add_all([b"c"])[0].json()["index"] == 2
    finally:
        stack.close()


def tiles_of(stack: Stack, size: int) -> list[bytes]:
    from tlog import tiles

    out: list[bytes] = []
    for b in tiles.bundles_for_size(size):
        out += tiles.decode_bundle(httpx.get(f"{stack.url}/{b}").content)
    return out


# -- the witness's state database fails ---------------------------------------------------


class FailingDB:
    """The state's SQLite connection, with writes failing as a full or read-only disk
    makes them fail while `error` is set (at the statement named by `at`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.error: sqlite3.Error | None = None
        self.at = "COMMIT"

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        if self.error is not None and sql.startswith(self.at):
            raise self.error
        return self.db.execute(sql, params)

    def close(self) -> None:
        self.db.close()


def cp_note(signer: note.Signer, size: int) -> bytes:
    leaves = [merkle.leaf_hash(b"e%d" % i) for i in range(size)]
    return checkpoint.sign(checkpoint.Checkpoint(signer.name, size, merkle.root(leaves)), signer)


def consistency(old: int, new: int) -> list[bytes]:
    leaves = [merkle.leaf_hash(b"e%d" % i) for i in range(new)]
    return merkle.consistency_proof(old, new, leaves)


@pytest.mark.parametrize("error,at", [
    (sqlite3.OperationalError("database or disk is full"), "COMMIT"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "INSERT"),
    (sqlite3.OperationalError("disk I/O error"), "SELECT"),
], ids=["disk-full", "read-only", "io-error"])
def test_witness_state_failure_is_503_and_never_a_cosignature(tmp_path, error, at):
    log = note.generate_signer("example.com/log")
    state = State(tmp_path / "witness.db")
    failing = FailingDB(state._db)
    state._db = failing  # type: ignore[assignment]
    app = WitnessApp(Witness(state, cosignature.generate_signer("w.example"),
                             {log.name: log.verifier()}))

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as c:
            async def post(old: int, size: int) -> httpx.Response:
                body = request.format(old, consistency(old, size) if old else [],
                                      cp_note(log, size))
                return await c.post("/add-checkpoint", content=body)

            assert (await post(0, 5)).status_code == 200
            failing.error, failing.at = error, at
            for size in (8, 9):  # the fault lasts
                r = await post(5, size)
                assert r.status_code == 503 and r.json()["code"] == "storage_unavailable"
                assert r.headers["retry-after"] == "1"
                assert "\u2014" not in r.text  # no cosignature line
            assert (await c.get("/")).status_code in (200, 503)
            assert (await c.get("/metrics")).status_code == 200
            failing.error = None
            assert state.get(log.name)[0] == 5  # nothing half-stored
            r = await post(5, 9)  # healed: the same request is cosigned now
            assert r.status_code == 200 and r.text.startswith("\u2014 w.example ")
            assert state.get(log.name)[0] == 9

    asyncio.run(go())
    state.close()


def test_real_full_disk_under_the_witness(small_fs, tmp_path):  # noqa: F811
    log = note.generate_signer("example.com/log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = small_fs / "w"
    proc = start("witness", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                 "--log", f"{log.name}={log.vkey}", ready=url + "/",
                 stderr_path=tmp_path / "witness.stderr")
    try:
        def post(old: int, size: int) -> httpx.Response:
            body = request.format(old, consistency(old, size) if old else [], cp_note(log, size))
            return httpx.post(f"{url}/add-checkpoint", content=body, timeout=10)

        assert post(0, 3).status_code == 200
        filler = fill(small_fs)
        size, refused = 3, None
        for new in range(4, 400):  # until the write-ahead log needs a new page
            r = post(size, new)
            if r.status_code == 200:
                size = new
                continue
            refused = r
            break
        assert refused is not None, "the full disk never refused a cosignature"
        assert refused.status_code == 503 and refused.json()["code"] == "storage_unavailable"
        assert httpx.get(f"{url}/readyz").status_code in (200, 503)
        filler.unlink()
        assert post(size, size + 1).status_code == 200
        stop(proc)
        proc = start("witness", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                     "--log", f"{log.name}={log.vkey}", ready=url + "/",
                     stderr_path=tmp_path / "witness.stderr")
        assert httpx.get(url + "/").json()["logs"][0]["size"] == size + 1
    finally:
        stop(proc)
