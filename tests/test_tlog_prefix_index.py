"""SQLite's leaf index and request-hash lookup are keyed by an 8-byte hash prefix that is
not unique: every answer is confirmed against the stored entry, so colliding prefixes
(findable with ~2^32 work) never merge two entries, hide one, or let a duplicate in; a
log written with the old hash-keyed tables is migrated on open and answers the same."""

from __future__ import annotations

import sqlite3

import pytest

from tests.test_tlog_crash import _run
from tlog import keys, merkle, sqlite_store, storage, tiles
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore


def receipt(request_hash: str, n: int) -> bytes:
    return b'{"n": %d, "request_hash": "%s"}' % (n, request_hash.encode())


H1, H2, H3 = "11" * 32, "22" * 32, "33" * 32


@pytest.fixture
def colliding(monkeypatch) -> None:
    """Every hash and every request hash has the same prefix."""
    monkeypatch.setattr(sqlite_store, "prefix", lambda digest: 7)


def test_colliding_prefixes_keep_entries_apart(tmp_path, colliding):
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    entries = [receipt(H1, 0), receipt(H2, 1), receipt(H1, 2), b"plain"]
    first = _run(Log(store, signer), entries)
    assert [r.index for r in first] == [0, 1, 2, 3]
    again = _run(Log(store, signer), [b"plain", receipt(H2, 1), b"new", receipt(H1, 0)])
    assert [r.index for r in again] == [3, 1, 4, 0]
    assert store.size() == 5
    hashes = [merkle.leaf_hash(e) for e in [*entries, b"new", b"absent"]]
    assert store.find_leaves(hashes) == {h: i for i, h in enumerate(hashes[:5])}
    assert store.lookup(H1) == 2  # the newest receipt with that request hash
    assert store.lookup(H2) == 1
    assert store.lookup(H3) is None  # same prefix, no such receipt
    store.close()


def test_a_duplicate_is_refused_despite_colliding_prefixes(tmp_path, colliding):
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    _run(Log(store, signer), [b"x", b"y"])
    changed = tiles.extend(2, [merkle.leaf_hash(b"y")], store.read_tile)
    with pytest.raises(storage.StorageError):
        store.persist(2, [b"y"], [merkle.leaf_hash(b"y")], changed, [])
    changed = tiles.extend(2, [merkle.leaf_hash(b"z")] * 2, store.read_tile)
    with pytest.raises(storage.StorageError):  # twice in one batch
        store.persist(2, [b"z", b"z"], [merkle.leaf_hash(b"z")] * 2, changed, [])
    store.persist(2, [b"z"], [merkle.leaf_hash(b"z")],
                  tiles.extend(2, [merkle.leaf_hash(b"z")], store.read_tile), [])
    assert store.read_entries(0, 5) == [b"x", b"y", b"z"]
    store.close()


OLD_INDEXES = """
CREATE TABLE lookup (key TEXT NOT NULL, idx INTEGER NOT NULL,
                     PRIMARY KEY (key, idx)) WITHOUT ROWID;
CREATE TABLE leaves (hash BLOB PRIMARY KEY, idx INTEGER NOT NULL) WITHOUT ROWID;
"""
"""The two indexes as the code before the prefix tables created them."""


def test_a_log_with_the_old_indexes_is_migrated_on_open(tmp_path):
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    entries = [receipt(H1, 0), receipt(H2, 1), b"plain", receipt(H1, 3)]
    _run(Log(store, signer), entries)
    store.close()
    db = sqlite3.connect(tmp_path / "log.db", isolation_level=None)  # as the old code left it
    db.execute("DROP TABLE leaf_prefixes")
    db.execute("DROP TABLE lookup_prefixes")
    db.executescript(OLD_INDEXES)
    db.executemany("INSERT INTO leaves VALUES (?, ?)",
                   [(merkle.leaf_hash(e), i) for i, e in enumerate(entries)])
    db.executemany("INSERT INTO lookup VALUES (?, ?)", [(H1, 0), (H2, 1), (H1, 3)])
    db.close()

    store = SQLiteStore(tmp_path / "log.db")
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}  # noqa: SLF001
    assert "leaves" not in tables and "lookup" not in tables
    assert store.lookup(H1) == 3 and store.lookup(H2) == 1 and store.lookup(H3) is None
    answers = _run(Log(store, signer), [b"plain", receipt(H1, 0), b"new"])
    assert [r.index for r in answers] == [2, 0, 4]
    assert store.leaves_indexed() == 5
    store.close()


def test_request_hashes_sharing_a_leading_run_get_different_prefixes():
    """Structured request hashes (sequential, a common leading run) do not pile up on one
    index key, which would make every GET /proof scan them all."""
    keys_ = [f"{i:064x}" for i in range(1000)] + [f"{i:032x}{7:08x}{0:024x}" for i in range(1000)]
    assert len({sqlite_store.key_prefix(k) for k in keys_}) == len(keys_)


def test_receipts_sharing_a_request_hash_do_not_slow_the_duplicate_check(tmp_path, monkeypatch):
    """A caller may choose its receipt salt and repeat a request, so any number of receipts
    can share one request hash. The duplicate check goes by leaf hash: an append reads a
    bounded number of stored entries however many share its request hash (a check keyed
    by request hash would read them all, in every batch)."""
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, signer)
    _run(log, [receipt(H1, n) for n in range(300)])
    calls = []
    real = merkle.leaf_hash
    monkeypatch.setattr(merkle, "leaf_hash", lambda e: calls.append(1) or real(e))
    answers = _run(log, [receipt(H1, 300), receipt(H1, 5)])
    assert [r.index for r in answers] == [300, 5]
    assert len(calls) < 20  # the batch's own hashes and a few confirmations, not 300
    store.close()
