"""Hash tiles by rowid and the inner rows of full leaf tiles (issue #16, proof growth).

SQLite keeps hash tiles in a rowid table keyed by `tile_id`; a log with the
older (level, idx) table is migrated on open. Each full leaf tile's inner row
(its 16 level-4 nodes) commits with the tile, on SQLite and PostgreSQL, and a
log without them gets them on open (`recover`), a crash part way included.
Inclusion proofs are byte for byte the same with or without the rows, and a
wrong or short row, or a leaf tile that does not hash to it, is refused with
StorageError (503 over HTTP), never turned into a proof. Tiles are served as
they were: the row is never part of one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.test_tlog_idempotent import open_store  # noqa: F401 - SQLite and PostgreSQL
from tests.test_tlog_postgres import pg_url  # noqa: F401 - the fresh-schema fixture
from tests.tlogutil import start_tlog, stop
from tlog import keys, merkle, note, proof, storage, tiles
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore, tile_id
from tlog.storage import StorageError

psycopg = pytest.importorskip("psycopg")


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


def raw_sql(store: storage.Storage, request) -> Callable[[str, tuple], None]:
    """Run SQL on the store's database behind its back (`?` placeholders, SQLite names)."""
    if isinstance(store, SQLiteStore):
        return lambda sql, params=(): store._db.execute(sql, params)
    db = psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True)
    request.addfinalizer(db.close)

    def run(sql: str, params: tuple = ()) -> None:
        db.execute(sql.replace("tile_inner", "tlog_tile_inner").replace("?", "%s"), params)

    return run


def test_an_inner_row_holds_the_level_4_nodes_of_its_tile() -> None:
    leaves = [merkle.leaf_hash(b"%d" % i) for i in range(256)]
    row = tiles.inner_row(b"".join(leaves))
    assert len(row) == tiles.INNER_BYTES == 512
    for k in range(16):  # node (4, k) of leaf tile 0: the root of leaves 16k .. 16k+15
        assert row[32 * k:32 * k + 32] == merkle.root(leaves[16 * k:16 * k + 16])
    assert tiles.run_root(row) == merkle.root(leaves)
    with pytest.raises(tiles.TileError):
        tiles.inner_row(b"".join(leaves[:255]))  # partial tiles have none


def test_persist_stores_the_inner_row_of_each_tile_it_fills(open_store) -> None:  # noqa: F811
    store = open_store()
    log = Log(store, note.generate_signer("test.example/inner"))
    build(log, [100, 300, 200])  # tile 0 filled by the 2nd batch, tile 1 by the 3rd
    assert store.inner_held() == 2
    for n in (0, 1):
        assert store.read_inner(n) == tiles.inner_row(store.read_tile(0, n))
    assert store.read_inner(2) == b""  # partial: no row
    store.close()


def test_a_log_without_inner_rows_gets_them_on_open_even_after_a_crash(
        open_store, request, monkeypatch) -> None:  # noqa: F811
    signer = note.generate_signer("test.example/inner")
    store = open_store()
    log = Log(store, signer)
    entries = build(log, [5 * 256 + 10])
    raw = raw_sql(store, request)
    raw("DELETE FROM tile_inner WHERE idx >= ?", (1,))  # as if tiles 1.. came from before
    assert store.inner_held() == 1
    monkeypatch.setattr(storage, "INNER_CHUNK", 2)
    real, calls = store.store_inner, []

    def crash_after_one_chunk(start: int, rows: list[bytes]) -> None:
        calls.append((start, len(rows)))
        if len(calls) > 1:
            raise StorageError("the disk is full")
        real(start, rows)

    monkeypatch.setattr(store, "store_inner", crash_after_one_chunk)
    with pytest.raises(StorageError):
        Log(store, signer)
    assert calls == [(1, 2), (3, 2)]
    assert store.inner_held() == 3  # the first chunk committed: a prefix, extended next open
    monkeypatch.setattr(store, "store_inner", real)
    log = Log(store, signer)
    assert store.inner_held() == 5
    for n in range(5):
        assert store.read_inner(n) == tiles.inner_row(store.read_tile(0, n))
    assert storage.store_inner_rows(store) == 0  # complete: nothing to do
    head = log.served
    for i in SAMPLE:
        assert log.proof_for(f"{i:064x}") == expected(entries, i, head.note)
    store.close()


OLD_TILES = """
CREATE TABLE tiles (level INTEGER, idx INTEGER, data BLOB NOT NULL,
                    PRIMARY KEY (level, idx)) WITHOUT ROWID;
"""
"""The tiles table as the code before `tile_id` created it (there were no inner rows)."""


def make_old(path: Path) -> None:
    """Rewrite a closed SQLite log into the layout before `tile_id` and inner rows."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("ALTER TABLE tiles RENAME TO tiles_by_id")
    db.executescript(OLD_TILES)
    db.execute("INSERT INTO tiles SELECT id >> 56, id & ((1 << 56) - 1), data FROM tiles_by_id")
    db.execute("DROP TABLE tiles_by_id")
    db.execute("DROP TABLE tile_inner")
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
    assert store.inner_held() == 0
    assert {k: store.read_tile(*k) for k in stored} == stored
    assert store._db.execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == len(stored)
    log = Log(store, signer)  # recover: same head, inner rows computed
    assert log.served.note == head.note
    assert store.inner_held() == 4
    for i in SAMPLE:
        assert log.proof_for(f"{i:064x}") == before[i] == expected(entries, i, head.note)
    more = build(log, [300])  # appends go on in the new layout
    assert store.inner_held() == 5
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


def corrupt_inner(row: bytes, other: bytes) -> list[tuple[str, bytes]]:
    flipped = bytearray(row)
    flipped[100] ^= 1
    return [("a flipped bit", bytes(flipped)), ("short", row[:-1]), ("long", row + b"\0"),
            ("another tile's row", other), ("the row's halves swapped", row[256:] + row[:256])]


@pytest.mark.parametrize("case", range(5))
def test_a_wrong_inner_row_is_refused_never_served(tmp_path, case: int) -> None:
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, signer)
    build(log, [600])
    name, bad = corrupt_inner(store.read_inner(1), store.read_inner(0))[case]
    store._db.execute("UPDATE tile_inner SET data = ? WHERE idx = 1", (bad,))
    log = Log(store, signer)  # cold caches, as after a restart
    for i in (256, 300, 511):
        with pytest.raises(StorageError):
            log.proof_for(f"{i:064x}")
    assert log.proof_for(f"{5:064x}") is not None  # tile 0's row is intact
    store.close()


def test_a_leaf_tile_that_does_not_hash_to_its_row_or_node_is_refused(tmp_path) -> None:
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, signer)
    build(log, [600])
    tile = bytearray(store.read_tile(0, 1))
    tile[40 * 32] ^= 1  # leaf 256 + 40, in group 2 of tile 1
    store._db.execute("UPDATE tiles SET data = ? WHERE id = ?", (bytes(tile), tile_id(0, 1)))
    for with_rows in (True, False):
        if not with_rows:
            store._db.execute("DELETE FROM tile_inner")
        log = Log(store, signer)
        with pytest.raises(StorageError):
            log.proof_for(f"{256 + 33:064x}")
    store.close()


def test_over_http_a_wrong_row_is_a_503_and_tiles_are_served_as_before(tmp_path) -> None:
    data = tmp_path / "log"
    data.mkdir()
    signer = keys.load_signer(data)
    store = SQLiteStore(data / "log.db")
    entries = build(Log(store, signer), [600])
    tile1 = store.read_tile(0, 1)
    bad = bytearray(store.read_inner(1))
    bad[0] ^= 1
    store._db.execute("UPDATE tile_inner SET data = ? WHERE idx = 1", (bytes(bad),))
    store.close()
    proc, url = start_tlog(data)
    try:
        r = httpx.get(f"{url}/proof/{300:064x}")
        assert r.status_code == 503 and r.json()["code"] == "storage_unavailable"
        r = httpx.get(f"{url}/proof/{3:064x}")
        assert r.status_code == 200
        p = proof.parse(r.content)
        assert p.extra == entries[3]
        t = httpx.get(f"{url}/tile/0/001")
        assert t.status_code == 200 and t.content == tile1 and len(t.content) == 8192
    finally:
        stop(proc)


def test_a_cold_path_hashes_a_group_and_the_row_not_the_whole_tile(tmp_path, monkeypatch) -> None:
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    entries = build(Log(store, signer), [600])
    hashed: list[int] = []
    real = tiles.run_layers

    def counting(data: bytes) -> list[bytes]:
        hashed.append(len(data) // 32)
        return real(data)

    monkeypatch.setattr(tiles, "run_layers", counting)
    log = Log(store, signer)
    assert log.proof_for(f"{300:064x}") == expected(entries, 300, log.served.note)
    assert sorted(hashed) == [16, 16]  # 15 + 15 SHA-256 (255 for the whole tile)
    store._db.execute("DELETE FROM tile_inner")
    hashed.clear()
    log = Log(store, signer)
    assert store.inner_held() == 2  # recover put them back
    store._db.execute("DELETE FROM tile_inner")
    assert log.proof_for(f"{301:064x}") == expected(entries, 301, log.served.note)
    assert hashed == [256]  # no row: the whole tile, as before
    store.close()
