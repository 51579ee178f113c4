"""Storage faults on the log (issue 17): disk full, read-only, the database dropped or gone.

Each fault must give a clean 503 `{"error", "code": "storage_unavailable"}`
with Retry-After (never a 5xx other than 503, never a traceback), lose or
corrupt nothing acknowledged, serve no partial entry, and heal by itself when
the fault clears: the same entries sent again are then logged once each.

Where the machine lets us (root with CAP_SYS_ADMIN), a real tmpfs is filled
up, or remounted read-only; everywhere, OSError(ENOSPC) and OSError(EROFS) are
injected at each storage step and each write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.tlogutil import free_port, start, start_tlog, stop
from tlog import checkpoint, keys, merkle, note, storage, tiles
from tlog.sequencer import Log
from tlog.server import TlogApp
from tlog.sqlite_store import SQLiteStore

psycopg = pytest.importorskip("psycopg")
PG = "postgresql://postgres@127.0.0.1:5432/test"
TOKEN = "fault-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
READ_ONLY = OSError(errno.EROFS, os.strerror(errno.EROFS))


class FaultyStore:
    """A real store whose `methods` raise `error` while `armed`: a write the disk refuses,
    or with `lost`, a write that committed but whose success never came back (a
    database connection dropped during COMMIT)."""

    def __init__(self, inner: storage.Storage, methods: set[str], error: Exception,
                 lost: bool = False) -> None:
        self.inner = inner
        self.methods = methods
        self.error = error
        self.lost = lost
        self.armed = False
        self.failed = 0

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if name not in self.methods:
            return attr

        def maybe_fail(*args: object) -> object:
            if self.armed:
                self.failed += 1
                if self.lost:
                    attr(*args)
                raise self.error
            return attr(*args)

        return maybe_fail


@contextlib.asynccontextmanager
async def serving(log: Log) -> AsyncIterator[httpx.AsyncClient]:
    """The log's ASGI app, started, behind an HTTP client (app exceptions propagate)."""
    app = TlogApp(log, TOKEN)
    await log.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://log") as c:
            yield c
    finally:
        await log.close()


async def add_all(c: httpx.AsyncClient, entries: list[bytes]) -> list[httpx.Response]:
    return list(await asyncio.gather(*(c.post("/add", content=e, headers=AUTH)
                                       for e in entries)))


def assert_refused(responses: list[httpx.Response]) -> None:
    for r in responses:
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "storage_unavailable"
        assert r.headers["retry-after"] == "1"


def check_tree(store: storage.Storage, signer: note.Signer, head_note: bytes,
               acked: dict[int, bytes], sent: set[bytes]) -> list[bytes]:
    """The tree under `head_note`: its root verifies, every acknowledged entry is at its
    index, every entry is one that was sent, whole, and none is there twice."""
    cp, _ = checkpoint.open(head_note, signer.verifier())
    entries = store.read_entries(0, cp.size)
    assert merkle.root([merkle.leaf_hash(e) for e in entries]) == cp.root_hash
    for index, entry in acked.items():
        assert entries[index] == entry
    assert set(entries) <= sent and len(set(entries)) == len(entries)
    return entries


WHERE = ["after:sequence", "write:persist", "lost:persist", "after:persist"]
"""Where the fault strikes: a storage write refused, a write done whose success was lost,
or the step done and then an error (the checkpoint commits in the persist step)."""


@pytest.mark.parametrize("error", [DISK_FULL, READ_ONLY], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("where", WHERE)
def test_injected_storage_fault_is_a_clean_503_and_heals(tmp_path, where, error):
    signer = keys.load_signer(tmp_path)
    kind, step = where.split(":")
    store = FaultyStore(SQLiteStore(tmp_path / "log.db"),
                        {step} if kind in ("write", "lost") else set(), error, kind == "lost")
    armed = threading.Event()

    def after(name: str) -> None:
        if kind == "after" and name == step and armed.is_set():
            raise error

    acked: dict[int, bytes] = {}
    first = [b"acked %d" % i for i in range(5)]
    retried = [b"refused %d" % i for i in range(4)]

    async def go() -> None:
        async with serving(Log(store, signer, faults=after)) as c:
            for e, r in zip(first, await add_all(c, first), strict=True):
                acked[r.json()["index"]] = e
            before = (await c.get("/checkpoint")).content
            armed.set()
            store.armed = True
            # the fault lasts: every round with entries to write is refused
            assert_refused(await add_all(c, retried[:2]))
            r = await c.post("/add-batch", content=tiles.encode_bundle(retried[2:]),
                             headers=AUTH)
            assert r.status_code == 200
            assert [x["code"] for x in r.json()["entries"]] == ["storage_unavailable"] * 2
            # reads go on from what was acknowledged; nothing beyond it is served
            assert (await c.get("/checkpoint")).content == before
            assert (await c.get("/tile/entries/000.p/5")).status_code == 200
            assert (await c.get("/tile/entries/000.p/6")).status_code == 404
            m = (await c.get("/metrics")).text
            assert 'tlog_append_refusals_total{code="storage_unavailable"}' in m
            armed.clear()
            store.armed = False
            answers = await add_all(c, [*retried, b"new"])  # sent again, healed, no restart
            assert all(r.status_code == 200 for r in answers)
            for e, r in zip([*retried, b"new"], answers, strict=True):
                acked[r.json()["index"]] = e
            after_note = (await c.get("/checkpoint")).content
            old, _ = checkpoint.open(before, signer.verifier())
            new, _ = checkpoint.open(after_note, signer.verifier())
            hashes = [merkle.leaf_hash(e) for e in store.read_entries(0, new.size)]
            merkle.verify_consistency(old.size, new.size,
                                      merkle.consistency_proof(old.size, new.size, hashes),
                                      old.root_hash, new.root_hash)

    asyncio.run(go())
    assert store.failed > 0 or kind == "after"
    entries = check_tree(store, signer, store.head().note, acked, {*first, *retried, b"new"})
    assert len(entries) == 10  # each retried entry exactly once
    store.inner.close()
    reopened = SQLiteStore(tmp_path / "log.db")  # a restart finds the same log
    assert Log(reopened, signer).head.size == 10
    reopened.close()


def test_disk_full_storing_cosignatures_refuses_the_append(tmp_path):
    """With a quorum, the cosignatures are stored before the append is answered: a disk
    that refuses them gives 503 storage_unavailable, the served checkpoint stays."""
    from tests.test_tlog_witnessing import honest, serve_fake
    from tlog.witnessing import WitnessPool
    from witness import cosignature

    w = cosignature.generate_signer("w.example")
    url, server = serve_fake(honest(w))
    signer = keys.load_signer(tmp_path)
    store = FaultyStore(SQLiteStore(tmp_path / "log.db"), {"update_note"}, DISK_FULL)
    pool = WitnessPool([url], [w.verifier()], quorum=1, timeout=3)

    async def go() -> None:
        async with serving(Log(store, signer, witnesses=pool)) as c:
            assert (await c.post("/add", content=b"one", headers=AUTH)).status_code == 200
            before = (await c.get("/checkpoint")).content
            store.armed = True
            assert_refused(await add_all(c, [b"two"]))
            assert (await c.get("/checkpoint")).content == before
            store.armed = False
            r = await c.post("/add", content=b"two", headers=AUTH)
            assert r.status_code == 200 and r.json()["index"] == 1
            cosignature.verify_witnessed((await c.get("/checkpoint")).content,
                                         signer.verifier(), [w.verifier()], quorum=1)

    try:
        asyncio.run(go())
    finally:
        server.shutdown()
        server.server_close()
        store.inner.close()


# -- a real small file system: full, then read-only -------------------------------------


@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs; skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected "
                    "ENOSPC/EROFS tests cover these faults")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free space).
    Unbuffered: a buffered file may keep the rest of a short write and try it again when
    closed, raising ENOSPC there (seen once in CI)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def start_on(data: Path, logs: Path) -> tuple[subprocess.Popen, str]:
    """`tlog serve --data DATA`, its stderr kept in `logs` (off the small file system)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start("tlog", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                 ready=f"{url}/checkpoint", stderr_path=logs / "tlog.stderr"), url


def test_real_disk_full_refuses_then_heals(small_fs, tmp_path):
    data = small_fs / "log"
    proc, url = start_on(data, tmp_path)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    auth = {"Authorization": f"Bearer {token}"}
    acked: dict[int, bytes] = {}
    sent: list[bytes] = []
    try:
        for i in range(10):
            e = b"small %d" % i
            acked[httpx.post(f"{url}/add", content=e, headers=auth).json()["index"]] = e
        filler = fill(small_fs)
        refused: list[bytes] = []
        for i in range(64):  # the WAL may still have room for a few: write until refused
            e = b"%05d" % i + secrets.token_bytes(60_000)
            sent.append(e)
            r = httpx.post(f"{url}/add", content=e, headers=auth, timeout=10)
            if r.status_code == 200:
                acked[r.json()["index"]] = e
                continue
            assert r.status_code == 503 and r.json()["code"] == "storage_unavailable"
            refused.append(e)
            if len(refused) == 3:
                break
        assert len(refused) == 3, "the full disk never refused an append"
        served = httpx.get(f"{url}/checkpoint").content
        cp, _ = checkpoint.open(served, verifier)
        assert cp.size == len(acked)  # nothing unacknowledged is served
        filler.unlink()
        for e in refused:  # healed without a restart; each refused entry logged once
            r = httpx.post(f"{url}/add", content=e, headers=auth, timeout=10)
            assert r.status_code == 200, r.text
            acked[r.json()["index"]] = e
        stop(proc)
        proc, url = start_on(data, tmp_path)  # and the file is sound after a restart
        latest, _ = checkpoint.open(httpx.get(f"{url}/checkpoint").content, verifier)
        entries: list[bytes] = []
        for b in tiles.bundles_for_size(latest.size):
            entries += tiles.decode_bundle(httpx.get(f"{url}/{b}").content)
        assert merkle.root([merkle.leaf_hash(e) for e in entries]) == latest.root_hash
        assert {i: entries[i] for i in acked} == acked
        assert len(set(entries)) == len(entries) == len(acked)
    finally:
        stop(proc)


def test_real_read_only_data_dir_is_refused_at_start_then_works(small_fs, tmp_path):
    """A data dir on a file system mounted read-only: `tlog serve` exits 2 with one line;
    remounted read-write, the log starts with every entry."""
    data = small_fs / "log"
    proc, url = start_on(data, tmp_path)
    token = (data / "append.token").read_text().strip()
    for e in (b"a", b"b"):
        assert httpx.post(f"{url}/add", content=e,
                          headers={"Authorization": f"Bearer {token}"}).status_code == 200
    stop(proc)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "tlog", "serve", "--data", str(data), "--listen",
                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "read-only file system" in r.stderr
    assert "Traceback" not in r.stderr
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    proc, url = start_on(data, tmp_path)
    try:
        assert httpx.get(f"{url}/tile/entries/000.p/2").content == tiles.encode_bundle(
            [b"a", b"b"])
    finally:
        stop(proc)


# -- PostgreSQL: the connection dropped mid-transaction, the database gone a while -------


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, psycopg.Connection]]:
    """A fresh schema and an admin connection; the URL names this test's application."""
    try:
        admin = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({e}); backend not tested")
    schema = "tlog_fault_" + secrets.token_hex(4)
    admin.execute(f"CREATE SCHEMA {schema}")
    opts = urllib.parse.quote(f"-csearch_path={schema}")
    yield f"{PG}?options={opts}&application_name={schema}", admin
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE application_name = %s", (schema,))
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def terminate_when_sleeping(admin: psycopg.Connection, app: str, table: str,
                            done: threading.Event) -> list[int]:
    """Terminate the log's backend once it sits inside a write to `table` (in pg_sleep,
    mid-transaction); returns the pids terminated."""
    killed: list[int] = []
    deadline = time.monotonic() + 20
    while not done.is_set() and time.monotonic() < deadline and not killed:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active' AND wait_event = 'PgSleep' AND query LIKE %s",
            (app, f"INSERT INTO {table}%")).fetchall()
        for (pid,) in rows:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            killed.append(pid)
        time.sleep(0.02)
    return killed


@pytest.mark.parametrize("table", ["tlog_entries", "tlog_checkpoints"],
                         ids=["persist", "checkpoint"])
def test_postgres_connection_dropped_mid_transaction(tmp_path, pg_schema, table):
    from tlog.postgres_store import PostgresStore

    url, admin = pg_schema
    app = url.rsplit("application_name=", 1)[1]
    schema = app
    signer = keys.load_signer(tmp_path)
    store = PostgresStore(url)
    acked: dict[int, bytes] = {}

    async def go() -> None:
        async with serving(Log(store, signer)) as c:
            for e, r in zip([b"a", b"b"], await add_all(c, [b"a", b"b"]), strict=True):
                acked[r.json()["index"]] = e
            before = (await c.get("/checkpoint")).content
            admin.execute(f"CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql "
                          "AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$")
            admin.execute(f"CREATE TRIGGER slow BEFORE INSERT ON {schema}.{table} "
                          f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.slow()")
            done = threading.Event()
            killer = asyncio.create_task(asyncio.to_thread(
                terminate_when_sleeping, admin, app, table, done))
            answers = await add_all(c, [b"c", b"d"])
            done.set()
            assert await killer, "the write transaction was never caught mid-way"
            assert_refused(answers)
            assert (await c.get("/checkpoint")).content == before
            admin.execute(f"DROP TRIGGER slow ON {schema}.{table}")
            answers = await add_all(c, [b"c", b"d", b"e"])  # reconnected, no restart
            assert [r.status_code for r in answers] == [200, 200, 200]
            for e, r in zip([b"c", b"d", b"e"], answers, strict=True):
                acked[r.json()["index"]] = e

    try:
        asyncio.run(go())
        check_tree(store, signer, store.head().note, acked, {b"a", b"b", b"c", b"d", b"e"})
        assert store.size() == 5
    finally:
        store.close()


@pytest.fixture
def pg_role(pg_schema) -> Iterator[tuple[str, str, psycopg.Connection]]:
    """A role of its own for the log, owning the test schema (so it can be locked out)."""
    url, admin = pg_schema
    schema = url.rsplit("application_name=", 1)[1]
    role = schema + "_role"
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"ALTER SCHEMA {schema} OWNER TO {role}")
    role_url = url.replace("postgres@", f"{role}@", 1)
    yield role_url, role, admin
    admin.execute(f"ALTER ROLE {role} LOGIN")
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                  (role,))
    admin.execute(f"ALTER SCHEMA {schema} OWNER TO postgres")
    admin.execute(f"DROP OWNED BY {role} CASCADE")
    admin.execute(f"DROP ROLE {role}")


def lock_out(admin: psycopg.Connection, role: str) -> None:
    """The database refuses the role: existing connections dropped, new ones refused."""
    admin.execute(f"ALTER ROLE {role} NOLOGIN")
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                  (role,))


def test_postgres_unavailable_for_a_while_then_back(tmp_path, pg_role):
    """`tlog serve --database` while the database refuses it for a few seconds: appends
    are refused with 503 and a code, reads are served, /readyz says 503; when the
    database is back the log appends again by itself and every entry is there once."""
    url, role, admin = pg_role
    data = tmp_path / "log"
    proc, base = start_tlog(data, "--database", url, "--lease-ttl", "1")
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    auth = {"Authorization": f"Bearer {token}"}
    acked: dict[int, bytes] = {}

    def add(e: bytes) -> httpx.Response:
        return httpx.post(f"{base}/add", content=e, headers=auth, timeout=15)

    def until_ok(e: bytes) -> httpx.Response:
        deadline = time.monotonic() + 20
        while True:
            r = add(e)
            if r.status_code == 200 or time.monotonic() > deadline:
                return r
            time.sleep(0.1)

    try:
        for e in (b"a", b"b", b"c"):
            acked[until_ok(e).json()["index"]] = e  # until elected sequencer
        served = httpx.get(f"{base}/checkpoint").content
        lock_out(admin, role)
        codes = set()
        for i in range(6):
            r = add(b"during %d" % i)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            codes.add(r.json()["code"])
            time.sleep(0.25)
        # the sequencer's writes fail, and after a lease ttl without renewal it steps down
        assert codes <= {"storage_unavailable", "not_sequencer"} and codes
        assert httpx.get(f"{base}/checkpoint").content == served
        r = httpx.get(f"{base}/tile/entries/000.p/3")  # a partial bundle: not cached
        assert r.status_code == 503 and r.json()["code"] == "storage_unavailable"
        assert httpx.get(f"{base}/readyz").status_code == 503
        admin.execute(f"ALTER ROLE {role} LOGIN")
        for i in range(6):
            e = b"during %d" % i
            r = until_ok(e)
            assert r.status_code == 200, r.text
            acked[r.json()["index"]] = e
        assert httpx.get(f"{base}/readyz").status_code == 200
        cp, _ = checkpoint.open(httpx.get(f"{base}/checkpoint").content, verifier)
        entries = tiles.decode_bundle(httpx.get(f"{base}/tile/entries/000.p/{cp.size}").content)
        assert cp.size == 9 and sorted(entries) == sorted(acked.values())
        assert {i: entries[i] for i in acked} == acked
    finally:
        stop(proc)


