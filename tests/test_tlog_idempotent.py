"""Idempotent appends (issue 17): the log holds each entry once, whatever is sent again.

An entry already held, or sent twice in one sequencing round, is answered with
its one index and a proof; after a crash or kill -9 between any two storage
steps, sending it again still resolves to the one entry; a log created before
the leaf index gets it on open. SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.test_tlog_crash import _run
from tests.test_tlog_postgres import pg_url  # noqa: F401 - the fresh-schema fixture
from tests.tlogutil import start_tlog, stop
from tlog import checkpoint, keys, merkle, note, proof, storage, tiles
from tlog.sequencer import Added, AppendError, Log
from tlog.sqlite_store import SQLiteStore, tile_id

psycopg = pytest.importorskip("psycopg")

Opener = Callable[[], storage.Storage]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path) -> Iterator[Opener]:
    """Opens (and reopens, as after a restart) one log's store on either backend."""
    if request.param == "sqlite":
        yield lambda: SQLiteStore(tmp_path / "log.db")
    else:
        from tlog.postgres_store import PostgresStore

        url = request.getfixturevalue("pg_url")
        yield lambda: PostgresStore(url)


def stored(store: storage.Storage) -> list[bytes]:
    return store.read_entries(0, store.size())


def check_answer(signer: note.Signer, entry: bytes, added: Added) -> None:
    """The answer is a proof that `entry` is at `added.index` under the signed checkpoint."""
    p = proof.parse(added.proof)
    cp, _ = checkpoint.open(added.checkpoint, signer.verifier())
    assert p.index == added.index and p.extra == entry
    proof.check_inclusion(p, cp, entry)


def test_an_entry_sent_again_keeps_its_index(tmp_path, open_store):
    signer = keys.load_signer(tmp_path)
    store = open_store()
    first = _run(Log(store, signer), [b"a", b"b", b"c"])
    log = Log(store, signer)
    again = _run(log, [b"b", b"d", b"a"])
    assert [r.index for r in first] == [0, 1, 2]
    assert [r.index for r in again] == [1, 3, 0]
    for entry, r in zip([b"b", b"d", b"a"], again, strict=True):
        check_answer(signer, entry, r)
    assert stored(store) == [b"a", b"b", b"c", b"d"]
    assert log.duplicates == 2
    store.close()


def test_duplicates_in_one_round_resolve_to_one_index(tmp_path, open_store):
    signer = keys.load_signer(tmp_path)
    store = open_store()
    log = Log(store, signer)
    entries = [b"x", b"y", b"x", b"x", b"z", b"y"] * 20
    results = _run(log, entries)  # queued together: one or a few sequencing rounds
    index = {e: {r.index for e2, r in zip(entries, results, strict=True) if e2 == e}
             for e in set(entries)}
    assert all(len(v) == 1 for v in index.values()), index
    assert sorted(stored(store)) == [b"x", b"y", b"z"]
    for entry, r in zip(entries, results, strict=True):
        check_answer(signer, entry, r)
    store.close()


def test_a_second_copy_can_never_be_persisted(tmp_path, open_store):
    """The leaf index refuses a duplicate even if the sequencer were to send one."""
    signer = keys.load_signer(tmp_path)
    store = open_store()
    _run(Log(store, signer), [b"only once"])
    changed = tiles.extend(1, [merkle.leaf_hash(b"only once")], store.read_tile)
    with pytest.raises(storage.StorageError):
        store.persist(1, [b"only once"], [merkle.leaf_hash(b"only once")], changed, [])
    assert stored(store) == [b"only once"]
    store.close()


class Crash(Exception):
    """Stands for the process dying right after a step."""


@pytest.mark.parametrize("step", storage.STEPS)
def test_retry_after_a_crash_between_steps_is_one_entry(tmp_path, open_store, step):
    signer = keys.load_signer(tmp_path)
    store = open_store()
    _run(Log(store, signer), [b"before"])

    def crash(name: str) -> None:
        if name == step:
            raise Crash(name)

    lost = _run(Log(store, signer, faults=crash), [b"retried", b"other"])
    assert all(isinstance(r, AppendError) for r in lost)
    store.close()
    store = open_store()  # a restart: recover covers what step 2 persisted
    retried = _run(Log(store, signer), [b"retried", b"other", b"retried"])
    assert [r.index for r in retried] == [1, 2, 1]
    assert stored(store) == [b"before", b"retried", b"other"]
    for entry, r in zip([b"retried", b"other", b"retried"], retried, strict=True):
        check_answer(signer, entry, r)
    store.close()


def _append_as_old_version(store: storage.Storage, signer: note.Signer, raw: Callable,
                           entry: bytes) -> None:
    """Append `entry` the way a log without a leaf index did: no duplicate check, no
    leaf row (raw SQL through `raw(sql, params)`; a tile through `raw(None, (level,
    index, data))`, in the table as the store now keys it)."""
    size = store.size()
    changed = tiles.extend(size, [merkle.leaf_hash(entry)], store.read_tile)
    raw("INSERT INTO entries (idx, data) VALUES (?, ?)", (size, entry))
    for (level, index), data in changed.items():
        raw(None, (level, index, data))
    root = merkle.tree_root(size + 1, storage.node_reader(store.read_tile))
    head = storage.sign_head(signer, size + 1, root)
    raw("INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)",
        (head.size, head.root, head.note))


def test_a_log_from_before_the_leaf_index_gets_it_on_open(tmp_path, request, open_store):
    signer = keys.load_signer(tmp_path)
    store = open_store()
    _run(Log(store, signer), [b"a", b"b", b"c"])
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(tmp_path / "log.db", isolation_level=None)

        def raw(sql: str | None, params: tuple) -> None:
            if sql is None:
                level, index, data = params
                sql, params = ("INSERT OR REPLACE INTO tiles (id, data) VALUES (?, ?)",
                               (tile_id(level, index), data))
            db.execute(sql, params)
        leaf_index = "leaf_prefixes"
    else:
        db = psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True)

        def raw(sql: str | None, params: tuple) -> None:
            if sql is None:
                db.execute("DELETE FROM tlog_tiles WHERE level = %s AND idx = %s", params[:2])
                sql = "INSERT INTO tiles (level, idx, data) VALUES (?, ?, ?)"
            for table in ("entries", "tiles", "checkpoints"):
                sql = sql.replace(f" {table} ", f" tlog_{table} ")
            db.execute(sql.replace("?", "%s"), params)
        leaf_index = "tlog_leaves"
    raw(f"DROP TABLE {leaf_index}", ())
    store.close()
    store = open_store()  # the table comes back, empty: the old log
    for entry in (b"b", b"b", b"d"):  # the old version logged b three times
        _append_as_old_version(store, signer, raw, entry)
    db.close()
    assert stored(store) == [b"a", b"b", b"c", b"b", b"b", b"d"]
    # SQLite indexed the three entries it held when it opened (tlog/recent.py)
    assert store.leaves_indexed() == (3 if isinstance(store, SQLiteStore) else 0)
    log = Log(store, signer)  # recover indexes every entry, the first copy of b wins
    assert store.leaves_indexed() == 6
    answers = _run(log, [b"b", b"d", b"a", b"e"])
    assert [r.index for r in answers] == [1, 5, 0, 6]
    assert stored(store)[6:] == [b"e"]
    store.close()


# -- real processes: kill -9 between the steps, and under load --------------------------


def _post(url: str, token: str, entry: bytes) -> httpx.Response:
    return httpx.post(f"{url}/add", content=entry, headers={"Authorization": f"Bearer {token}"},
                      timeout=10)


def _tree(url: str, verifier: note.Verifier) -> list[bytes]:
    """Every entry under the served checkpoint, checked against its root."""
    cp, _ = checkpoint.open(httpx.get(f"{url}/checkpoint").content, verifier)
    entries: list[bytes] = []
    for b in tiles.bundles_for_size(cp.size):
        entries += tiles.decode_bundle(httpx.get(f"{url}/{b}").content)
    assert merkle.root([merkle.leaf_hash(e) for e in entries]) == cp.root_hash
    return entries


@pytest.mark.parametrize("step", storage.STEPS)
def test_kill_between_steps_then_the_same_entry_is_one_entry(tmp_path, monkeypatch, step):
    """`tlog serve` dies (exit at once, like kill -9) right after `step` of the append;
    the client never got an answer and sends the entry again to the restarted log."""
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    assert _post(url, token, b"acked").json()["index"] == 0
    stop(proc)
    monkeypatch.setenv("PAG_TLOG_CRASH_AFTER", step)
    proc, url = start_tlog(data)
    with pytest.raises(httpx.HTTPError):
        _post(url, token, b"the receipt")
    assert proc.wait(10) == 137
    monkeypatch.delenv("PAG_TLOG_CRASH_AFTER")
    proc, url = start_tlog(data)
    try:
        first = _post(url, token, b"the receipt").json()
        second = _post(url, token, b"the receipt").json()
        assert first["index"] == second["index"] == 1
        assert _tree(url, verifier) == [b"acked", b"the receipt"]
    finally:
        stop(proc)


def test_kill_9_while_clients_retry_logs_every_entry_exactly_once(tmp_path):
    """The issue's shipper catch-up: clients resend every entry until acknowledged while
    the log is killed with SIGKILL and restarted; afterwards each entry is in the log once."""
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    entries = [b"receipt %d/%d" % (k, i) for k in range(32) for i in range(40)]
    acked: dict[bytes, int] = {}
    current = {"url": url}
    restarted = threading.Event()

    async def load() -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=5, limits=limits) as c:
            async def client(k: int) -> None:
                for entry in entries[k * 40:(k + 1) * 40]:
                    for _ in range(400):  # bounded: the restart takes a few seconds
                        try:
                            r = await c.post(f"{current['url']}/add", content=entry,
                                             headers={"Authorization": f"Bearer {token}"})
                        except httpx.HTTPError:
                            await asyncio.sleep(0.05)
                            continue
                        if r.status_code == 200:
                            index = r.json()["index"]
                            assert acked.setdefault(entry, index) == index
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError(f"{entry!r} never acknowledged")

            async def killer() -> None:
                for at in (200, 500, 800):  # three kills, each at a random moment of a batch
                    while len(acked) < at:
                        await asyncio.sleep(0.005)
                    procs[-1].send_signal(signal.SIGKILL)
                    await asyncio.to_thread(procs[-1].wait, 10)
                    new, current["url"] = await asyncio.to_thread(start_tlog, data)
                    procs.append(new)
                restarted.set()

            await asyncio.gather(killer(), *[client(k) for k in range(32)])

    procs = [proc]
    try:
        asyncio.run(load())
        assert restarted.is_set()
        tree = _tree(current["url"], verifier)
        counts = Counter(tree)
        assert counts == Counter(entries), "an entry is missing or logged twice"
        for entry, index in acked.items():
            assert tree[index] == entry
    finally:
        for p in procs:
            stop(p)
