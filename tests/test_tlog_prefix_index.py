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
    keys_ = [storage.lookup_key(e) for e in [*entries, b"new", b"absent"]]
    assert store.find_leaves(hashes, keys_) == {h: i for i, h in enumerate(hashes[:5])}
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
        store.persist(2, [b"y"], changed, [])
    changed = tiles.extend(2, [merkle.leaf_hash(b"z")] * 2, store.read_tile)
    with pytest.raises(storage.StorageError):  # twice in one batch
        store.persist(2, [b"z", b"z"], changed, [])
    store.persist(2, [b"z"], tiles.extend(2, [merkle.leaf_hash(b"z")], store.read_tile), [])
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
    db.execute("DROP TABLE meta")
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


def _rows(store: SQLiteStore, table: str) -> list[int]:
    return [r[0] for r in store._db.execute(f"SELECT idx FROM {table} ORDER BY idx")]  # noqa: SLF001, S608


def test_each_entry_is_in_one_index_and_its_duplicates_are_found(tmp_path):
    """A receipt is indexed only by its lookup key, other entries only by leaf hash; a
    duplicate of either, sent after a reopen, resolves to the entry already held."""
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    _run(Log(store, signer), [receipt(H1, 0), b"plain", receipt(H2, 1), b"other"])
    assert _rows(store, "leaf_prefixes") == [1, 3]
    assert _rows(store, "lookup_prefixes") == [0, 2]
    assert store.leaves_indexed() == 4
    store.close()
    store = SQLiteStore(tmp_path / "log.db")
    answers = _run(Log(store, signer), [receipt(H2, 1), b"other", receipt(H2, 9), b"plain"])
    assert [r.index for r in answers] == [2, 3, 4, 1]
    assert store.leaves_indexed() == 5
    with pytest.raises(storage.StorageError):  # persist refuses a held receipt too
        store.persist(5, [receipt(H1, 0)], tiles.extend(5, [merkle.leaf_hash(receipt(H1, 0))],
                                                         store.read_tile), [(H1, 5)])
    store.close()


def test_a_log_from_before_meta_finds_receipts_in_its_leaf_index(tmp_path):
    """A log written when every entry went into the leaf index gets `meta` on open, and a
    receipt it holds is found there even where the lookup index lacks it."""
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    entries = [receipt(H1, 0), b"plain", receipt(H2, 1)]
    _run(Log(store, signer), entries)
    store.close()
    db = sqlite3.connect(tmp_path / "log.db", isolation_level=None)  # as the old code left it
    db.execute("DROP TABLE meta")
    db.executemany("INSERT OR IGNORE INTO leaf_prefixes VALUES (?, ?)",
                   [(sqlite_store.prefix(merkle.leaf_hash(e)), i) for i, e in enumerate(entries)])
    db.execute("DELETE FROM lookup_prefixes WHERE idx = 2")  # a key an older parser missed
    db.close()
    store = SQLiteStore(tmp_path / "log.db")
    assert store.leaves_indexed() == 3
    answers = _run(Log(store, signer), [receipt(H2, 1), receipt(H1, 0), receipt(H3, 2)])
    assert [r.index for r in answers] == [2, 0, 3]
    assert _rows(store, "leaf_prefixes") == [0, 1, 2]  # the new receipt is not added there
    assert store.size() == 4
    store.close()


def test_an_old_log_whose_last_entry_is_a_receipt_gets_its_leaf_index(tmp_path):
    """Recovery follows `leaves_indexed`, not a probe of the last entry: a log without the
    leaf index re-indexes its plain entries even when the last entry is a receipt."""
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    _run(Log(store, signer), [b"plain", receipt(H1, 0)])
    store.close()
    db = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    db.execute("DROP TABLE meta")
    db.execute("DELETE FROM leaf_prefixes")
    db.close()
    store = SQLiteStore(tmp_path / "log.db")
    assert store.leaves_indexed() == 0
    answers = _run(Log(store, signer), [b"plain", receipt(H1, 0), b"new"])
    assert [r.index for r in answers] == [0, 1, 2]
    assert store.leaves_indexed() == 3
    store.close()
