"""Hash tiles by rowid (issue #16, proof growth).

SQLite keeps hash tiles in a rowid table keyed by `tile_id`; a log with the
older (level, idx) table is migrated on open and proves the same.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tlog import keys, merkle, proof, tiles
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore, tile_id


def receipt(i: int) -> bytes:
    return b'{"request_hash": "%064x"}' % i


def build(log: Log, sizes: list[int]) -> list[bytes]:
    """Commit batches of new receipts of these sizes; the entries, in order."""
    entries: list[bytes] = []
    for n in sizes:
        chunk = [receipt(log.size + i) for i in range(n)]
        log.served = log._commit(chunk)[0]
        entries += chunk
    return entries


def expected(entries: list[bytes], i: int, head_note: bytes) -> bytes:
    leaves = [merkle.leaf_hash(e) for e in entries]
    path = tuple(merkle.inclusion_proof(i, len(entries), leaves))
    return proof.TlogProof(i, path, head_note, entries[i]).format()


SAMPLE = [0, 1, 15, 16, 255, 256, 300, 511, 700, 1023, 1030]


OLD_TILES = """
CREATE TABLE tiles (level INTEGER, idx INTEGER, data BLOB NOT NULL,
                    PRIMARY KEY (level, idx)) WITHOUT ROWID;
"""
"""The tiles table as the code before `tile_id` created it."""


def make_old(path: Path) -> None:
    """Rewrite a closed SQLite log into the layout before `tile_id`."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("ALTER TABLE tiles RENAME TO tiles_by_id")
    db.executescript(OLD_TILES)
    db.execute("INSERT INTO tiles SELECT id >> 56, id & ((1 << 56) - 1), data FROM tiles_by_id")
    db.execute("DROP TABLE tiles_by_id")
    db.close()


def test_an_old_format_log_is_migrated_on_open_and_proves_the_same(tmp_path) -> None:
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, signer)
    entries = build(log, [700, 400])
    head = log.served
    before = {i: log.proof_for(f"{i:064x}") for i in SAMPLE}
    stored = {(t.level, t.index): store.read_tile(t.level, t.index)
              for t in tiles.tiles_for_size(head.size)}
    store.close()
    make_old(tmp_path / "log.db")

    store = SQLiteStore(tmp_path / "log.db")  # migrates the tiles table
    cols = [r[1] for r in store._db.execute("PRAGMA table_info(tiles)")]
    assert cols == ["id", "data"]
    assert {k: store.read_tile(*k) for k in stored} == stored
    assert store._db.execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == len(stored)
    log = Log(store, signer)  # recover: the same head
    assert log.served.note == head.note
    for i in SAMPLE:
        assert log.proof_for(f"{i:064x}") == before[i] == expected(entries, i, head.note)
    more = build(log, [300])  # appends go on in the new layout
    assert log.proof_for(f"{1300:064x}") == expected(entries + more, 1300, log.served.note)
    store.close()
    store = SQLiteStore(tmp_path / "log.db")  # nothing left to migrate
    assert Log(store, signer).served.size == 1400
    store.close()


def test_tile_ids_are_one_to_one_and_positive() -> None:
    top = tile_id(tiles.MAX_LEVEL, tiles.MAX_INDEX)
    assert 0 < top < 1 << 63
    assert tiles.MAX_INDEX < 1 << 56
    assert tile_id(1, 0) == 1 << 56 > tile_id(0, tiles.MAX_INDEX)


