"""SQLite keeps the index rows of its newest entries in memory and folds them into the
stored indexes piece by piece (tlog/recent.py): at every point (between pieces, after a
failed piece, in a crash image taken after any append, with every prefix colliding)
each entry is found by its leaf hash and its request hash, a duplicate keeps its first
index, and the stored index covers every entry below the recorded `below`."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.test_tlog_crash import _run
from tlog import keys, merkle, recent, sqlite_store, storage
from tlog.recent import Memory, Recent
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore, key_prefix, prefix, slice_bounds


def receipt(n: int) -> bytes:
    return b'{"n": %d, "request_hash": "%064x"}' % (n, n % 97)


def request_hash(n: int) -> str:
    return f"{n % 97:064x}"


@pytest.fixture
def small_folds(monkeypatch) -> None:
    """Folds of 16 entries in 4 pieces, 4 slices: many folds in a short test."""
    monkeypatch.setattr(recent, "FOLD_AT", 16)
    monkeypatch.setattr(recent, "PIECES", 4)
    monkeypatch.setattr(sqlite_store, "PIECES", 4)
    monkeypatch.setattr(sqlite_store, "SLICES", 4)


def stored_rows(path, table: str) -> set[tuple[int, int]]:
    db = sqlite3.connect(path)
    try:
        return set(db.execute(f"SELECT prefix, idx FROM {table}"))  # noqa: S608
    finally:
        db.close()


def open_log(tmp_path) -> tuple[SQLiteStore, Log, Path]:
    """The store at tmp_path/log.db and a sequencer on it."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    return store, Log(store, keys.load_signer(tmp_path)), path


def check(store: SQLiteStore, path, entries: list[bytes], disjoint: bool = False) -> None:
    """Every entry found at its index by leaf hash; every request hash at its newest entry;
    the stored rows (main and young tables) cover every entry below `below`, and memory
    every entry from it. `disjoint`: no row is in both tables (a fold written again after
    a restart may put back in a young table rows that an earlier piece had moved on)."""
    hashes = [merkle.leaf_hash(e) for e in entries]
    assert store.find_leaves(hashes) == {h: i for i, h in enumerate(hashes)}
    assert store.find_leaves([merkle.leaf_hash(b"absent")]) == {}
    newest = {request_hash(n): i for i, n in enumerate(range(len(entries)))}
    for key, ix in newest.items():
        assert store.lookup(key) == ix
    assert store.lookup("ff" * 32) is None
    memory = store._memory  # noqa: SLF001 - the invariant under test
    assert memory.end == len(entries)
    for table in sqlite_store.INDEXES:
        main = stored_rows(path, table)
        young = stored_rows(path, f"young_{table}")
        assert not (disjoint and main & young)
        held = {ix for _, ix in main | young}
        assert set(range(memory.below)) <= held
    for i, h in enumerate(hashes[memory.below:], memory.below):
        assert i in memory.leaf_indices([prefix(h)])
        assert i in memory.key_indices(key_prefix(request_hash(i)))


def test_recent_keeps_each_row_once_and_runs_them_by_key_range(small_folds):
    top = (1 << 63) - 1
    r = Recent()
    r.add([(5, 1), (-3, 2), (5, 4), (5, 1), (top, 0), (5, 3), (-(1 << 63), 6)])
    r.add([(5, 4), (-3, 2)])
    assert r.indices([5]) == {1, 3, 4} and r.indices([-3]) == {2} and r.indices([6]) == set()
    assert r.indices([5, 6, top]) == {0, 1, 3, 4}
    assert [list(r.run(k)) for k in range(4)] == [[(-(1 << 63), 6)], [(-3, 2)], [(5, 1), (5, 3), (5, 4)],
                                            [(top, 0)]]


def test_slices_split_the_prefix_space_in_order():
    bounds = [slice_bounds(k, 64) for k in range(64)]
    assert bounds[0][0] == -(1 << 63) and bounds[-1][1] == (1 << 63) - 1
    assert all(hi + 1 == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False))


def test_memory_keeps_a_fold_readable_until_its_last_piece(small_folds):
    m = Memory(0)
    m.add(20, [(p, p) for p in range(20)], [(100 + p, p) for p in range(20)])
    assert m.due()
    m.start_fold()
    m.add(22, [(50, 20), (51, 21)], [])
    assert not m.due() and m.leaf_indices([3]) == {3} and m.leaf_indices([50, 3, 8]) == {20, 3, 8}
    for _ in range(3):
        m.piece_written()
        assert m.leaf_indices([3]) == {3} and m.below == 0
    m.piece_written()
    assert m.draining is None and m.below == 20 and m.leaf_indices([3]) == set()
    assert m.key_indices(100) == set() and m.leaf_indices([51]) == {21}


class FoldOnRead(Memory):
    """Memory whose next read of `leaves` or `keys` first starts a fold: what a reader on
    another thread sees when a fold starts between its two reads."""

    fold_next_read = False

    def _rows(self, name: str) -> Recent:
        if self.fold_next_read:
            self.fold_next_read = False
            self.start_fold()
        return self.__dict__[name]

    leaves = property(lambda self: self._rows("_leaves"),
                      lambda self, v: self.__dict__.__setitem__("_leaves", v))
    keys = property(lambda self: self._rows("_keys"),
                    lambda self, v: self.__dict__.__setitem__("_keys", v))


def test_a_fold_starting_between_a_readers_reads_hides_no_row(small_folds):
    m = FoldOnRead(0)
    m.add(20, [(p, p) for p in range(20)], [(100 + p, p) for p in range(20)])
    m.fold_next_read = True
    assert m.leaf_indices([3, 4]) == {3, 4}
    assert m.draining is not None  # the fold did start between the reads
    m = FoldOnRead(0)
    m.add(20, [(p, p) for p in range(20)], [(100 + p, p) for p in range(20)])
    m.fold_next_read = True
    assert m.key_indices(105) == {5}
    assert m.draining is not None


def test_appends_fold_through_young_into_main_tables(tmp_path, small_folds):
    store, log, path = open_log(tmp_path)
    entries: list[bytes] = []
    biggest = 0
    for size in (1, 5, 16, 3, 40, 7, 2, 30, 1, 1, 64, 9) * 3:
        batch = [receipt(len(entries) + i) for i in range(size)]
        assert [r.index for r in _run(log, batch)] == list(range(len(entries), len(entries) + size))
        entries += batch
        check(store, path, entries, disjoint=True)
        m = store._memory  # noqa: SLF001
        biggest = max(biggest, size)  # memory stays bounded: a fold and what fills meanwhile
        assert m.end - m.below < 2 * (recent.FOLD_AT + biggest)
    assert store._folds >= 4  # noqa: SLF001 - every slice was moved at least once
    assert stored_rows(path, "leaf_prefixes")  # rows reached the main tables
    again = _run(log, [entries[3], entries[150], b"new", entries[0]])
    assert [r.index for r in again] == [3, 150, len(entries), 0]
    store.close()


def test_every_crash_image_reopens_with_every_entry_indexed(tmp_path, small_folds):
    """A copy of the files taken after each append is what kill -9 at that point leaves."""
    store, log, path = open_log(tmp_path)
    entries: list[bytes] = []
    for n, size in enumerate((3, 17, 5, 9, 33, 2, 11, 20, 6)):
        batch = [receipt(len(entries) + i) for i in range(size)]
        _run(log, batch)
        entries += batch
        image = tmp_path / f"image{n}"
        image.mkdir()
        for name in ("log.db", "log.db-wal"):
            shutil.copy(tmp_path / name, image / name)
        reopened = SQLiteStore(image / "log.db")
        check(reopened, image / "log.db", entries)
        more = _run(Log(reopened, keys.load_signer(tmp_path)), [entries[-1], b"after %d" % n])
        assert [r.index for r in more] == [len(entries) - 1, len(entries)]
        reopened.close()
    store.close()


def test_a_failed_piece_commits_nothing_and_the_next_append_writes_it(tmp_path, small_folds,
                                                                      monkeypatch):
    store, log, path = open_log(tmp_path)
    entries = [receipt(i) for i in range(20)]
    _run(log, entries)  # 20 rows held: the next append starts a fold
    write = SQLiteStore._write_piece  # noqa: SLF001

    def failing(self, db, k):
        write(self, db, k)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_write_piece", failing)
    with pytest.raises(storage.StorageError):
        store.persist(20, [receipt(20)], [merkle.leaf_hash(receipt(20))], {}, [])
    assert store.size() == 20 and store._memory.piece == 0  # noqa: SLF001
    assert not stored_rows(path, "young_leaf_prefixes") | stored_rows(path, "leaf_prefixes")
    check(store, path, entries)
    monkeypatch.setattr(SQLiteStore, "_write_piece", write)
    more = [receipt(20 + i) for i in range(30)]
    _run(log, more)
    check(store, path, entries + more)
    store.close()
    store = SQLiteStore(path)
    check(store, path, entries + more)
    store.close()


def test_colliding_prefixes_are_confirmed_in_memory_and_in_storage(tmp_path, small_folds,
                                                                   monkeypatch):
    monkeypatch.setattr(sqlite_store, "prefix", lambda digest: 7)
    store, log, _ = open_log(tmp_path)
    entries = [receipt(i) for i in range(60)]
    _run(log, entries[:30])
    _run(log, entries[30:])
    assert [r.index for r in _run(log, [entries[5], entries[45], b"x"])] == [5, 45, 60]
    hashes = [merkle.leaf_hash(e) for e in entries]
    assert store.find_leaves(hashes) == {h: i for i, h in enumerate(hashes)}
    assert store.lookup(request_hash(5)) == 5 and store.lookup(request_hash(96)) is None
    with pytest.raises(storage.StorageError):
        store.persist(61, [entries[50]], [merkle.leaf_hash(entries[50])], {}, [])
    store.close()


def test_a_log_whose_stored_index_lags_far_is_folded_on_open(tmp_path, small_folds):
    store, log, path = open_log(tmp_path)
    entries = [receipt(i) for i in range(150)]
    _run(log, entries)
    store.close()
    db = sqlite3.connect(path, isolation_level=None)  # as an old version without the index left it
    for table in ("leaf_prefixes", "young_leaf_prefixes", "young_lookup_prefixes",
                  "lookup_prefixes", "folds"):
        db.execute(f"DELETE FROM {table}")  # noqa: S608
    db.close()
    store = SQLiteStore(path)
    m = store._memory  # noqa: SLF001
    assert m.end == 150 and m.end - m.below < recent.CATCH_UP_FOLDS * recent.FOLD_AT
    check(store, path, entries)
    store.close()


def test_a_missing_entry_fails_the_open_and_releases_the_log(tmp_path, small_folds):
    store, log, path = open_log(tmp_path)
    _run(log, [receipt(i) for i in range(40)])
    below = store._memory.below  # noqa: SLF001
    store.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM entries WHERE idx = ?", (below + 1,))  # above the stored index
    db.close()
    for _ in range(2):  # the failed open let go of its lock: the second fails the same way
        with pytest.raises(storage.StorageError, match="missing"):
            SQLiteStore(path)
