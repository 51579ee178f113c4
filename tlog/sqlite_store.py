"""SQLite storage for the log: WAL, synchronous=FULL, explicit transactions.

One file `log.db`. Every write is one `BEGIN IMMEDIATE … COMMIT`, fsynced
before it returns, so a step that returned survives kill -9. A write that
fails (disk full, read-only file system, I/O error) is rolled back and
raises StorageError; the connection stays usable, so the next write works
as soon as the file system accepts it again.

A log has one writer: opening the store takes an exclusive lock on
`log.lock` beside the database, held until `close` (or the process's end,
kill -9 included). A second store on the same file, in this process or
another, is refused with `LockHeld` before it reads or writes anything, so
two `tlog serve` on one data dir can never both sequence.

The two random-key indexes, the leaf index and the request-hash lookup, are
keyed by 8 bytes of a hash as a signed integer (`prefix` of the leaf hash,
`key_prefix` of the request hash), not by the whole hash: their rows are a
third of the size. A prefix is not unique (64-bit prefix collisions take ~2^32
work to find), so nothing rests on it: every prefix hit is confirmed against
the stored entry itself (its leaf hash, its lookup key), and `persist` refuses
an entry whose leaf hash a confirmed row holds. A log written before these
tables (`leaves` keyed by hash, `lookup` by hex key) is migrated on open, in
one transaction.

The newest entries' index rows are not written with them: they are held in
memory (tlog/recent.py) and folded in key order, a piece per append, into the
`young_` tables, while each fold moves one slice of the young tables into the
main ones. Every stored page is thus written about once per fold instead of
once per entry. The stored index covers every entry below `folds.below` (or,
before the first fold, below its highest index); on open the store rebuilds the
memory rows from the entries above, so a crash at any point loses none.
Lookups read memory, then both tables.

Hash tiles are rows of a rowid table keyed by `tile_id` (level and index in one
integer), each full leaf tile's inner row (tlog/storage.py) a 512-byte row of
`tile_inner` written in the same transaction as its tile. A log written with
the older `tiles` table keyed by (level, idx) is migrated on open, in the
same one transaction; its inner rows are computed by `recover`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import struct
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

from tlog import merkle
from tlog.recent import PIECES, Memory
from tlog.service import connect_durable, lock_exclusive
from tlog.storage import INDEX_CHUNK, Head, StorageError, inner_rows, lookup_key
from tlog.walpace import Pace

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tiles (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tile_inner (idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL,
                                        note BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lookup_prefixes (prefix INTEGER NOT NULL, idx INTEGER NOT NULL,
                                            PRIMARY KEY (prefix, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leaf_prefixes (prefix INTEGER NOT NULL, idx INTEGER NOT NULL,
                                          PRIMARY KEY (prefix, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS young_lookup_prefixes (prefix INTEGER NOT NULL, idx INTEGER NOT NULL,
                                                  PRIMARY KEY (prefix, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS young_leaf_prefixes (prefix INTEGER NOT NULL, idx INTEGER NOT NULL,
                                                PRIMARY KEY (prefix, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS folds (id INTEGER PRIMARY KEY CHECK (id = 0), count INTEGER NOT NULL,
                                  below INTEGER NOT NULL);
"""
"""`tiles` holds hash tiles by `tile_id`, `tile_inner` each full leaf tile's inner row by
its index (tlog/storage.py); `leaf_prefixes` is the leaf index, `lookup_prefixes` the
request-hash lookup, both by `prefix`, confirmed against the entry. Each has a `young_`
table of the rows folded most recently, moved into it a slice at a time; `folds` counts
the folds, so the slice moved next survives a restart."""

INDEXES = ("leaf_prefixes", "lookup_prefixes")
"""The two prefix indexes; each is its table and its `young_` table."""

SLICES = 16
"""Each fold moves one sixteenth of the prefix space (taken in turn) from the `young_`
tables into the main ones. Rows stay young for SLICES folds on average, so the young
tables hold ~SLICES * FOLD_AT rows (~1M) and a fold rewrites most of their pages, but
only a sixteenth of the main tables'. Appending 1.2M entries to a log of 10M wrote 1.4 KB
to disk per entry (WAL and checkpoints), against 67 KB with rows inserted one by one."""

OLD_TABLES = ("leaves", "lookup")
"""The indexes of logs written before the prefix tables; `migrate` replaces them."""

WRITER_CACHE_KIB = 32768
"""Page cache of the writing connection (SQLite's default is 2 MiB): the index pages a
batch touches stay cached for the next one."""

READER_CACHE_KIB = 16384
"""Page cache of the reading connection: the inner pages of the 10M log's leaf index stay
cached under random proof lookups (`GET /proof` p50 at 10M over 1M, each over a bare GET:
1.22-1.27x with 2 MiB, 1.22x with 8, 0.93-1.05x with 16)."""

WAL_PAGES = 10000
"""Pages the WAL may hold before a commit copies them back into the database itself
(SQLite's default is 1000): only when the checkpoint thread falls behind."""

CHECKPOINT_EVERY = 0.25
"""Seconds between the checkpoint thread's looks at the WAL: a passive checkpoint runs at a
look once enough was committed since the last (tlog/walpace.py). They copy committed WAL
pages into the database on a connection of their own, so no append waits for them: with
only the automatic checkpoint, run by the committing thread, `POST /add` at 64 clients on
a log of 10M entries had a p99 of 300 ms (105 ms with no checkpoint at all). A checkpoint
only copies what commits already made durable."""

BYTES_PER_WEIGHT = 32 << 10
"""A batch of B bytes of entries weighs 1 + B // BYTES_PER_WEIGHT in the checkpoint thread's
pace (tlog/walpace.py): a few large batches, which write many pages, make a checkpoint due
as many small ones do, well before the WAL reaches WAL_PAGES. (Weighed by their count,
twelve batches of 63 entries of 60 kB, 0.3 s apart, grew the WAL to 41 MiB and made an
append checkpoint itself; by their bytes, or with a checkpoint at every tick, 3.8 MiB.)"""

IN_LIST = 500
"""Prefixes looked up per query (SQLite limits the number of bound parameters)."""


def tile_id(level: int, index: int) -> int:
    """The row id of hash tile (level, index): `level << 56 | index`.

    One-to-one since a tile index is below 2^56 (tiles.MAX_INDEX < 2^55) and a level at
    most 63, so the id stays below 2^62: a positive rowid. A rowid table finds an 8 KiB
    tile in ~9 us where the former WITHOUT ROWID (level, idx) key took ~33 us (its
    B-tree search read the rows' overflow pages)."""
    return level << 56 | index


_INT64 = struct.Struct(">q").unpack_from


def prefix(digest: bytes) -> int:
    """The index key of a hash: its first 8 bytes as a signed 64-bit integer (not unique)."""
    return _INT64(digest)[0]


def key_prefix(key: str) -> int:
    """The index key of a lookup key (a request hash in hex): `prefix` of its SHA-256, so
    request hashes that are not uniformly random (sequential test keys, a shared leading
    run) still spread over the index instead of piling up on one prefix."""
    return prefix(hashlib.sha256(key.encode()).digest())


def slice_bounds(k: int, count: int) -> tuple[int, int]:
    """The prefixes of slice `k` of `count` (a power of two), both ends included: equal
    ranges in order over the signed 64-bit integers."""
    width = (1 << 64) // count
    lo = -(1 << 63) + k * width
    return lo, lo + width - 1


def migrate(db: sqlite3.Connection) -> None:
    """Bring an older log's tables to this schema in one transaction: the hash-keyed indexes
    (`leaves`, `lookup`) into the prefix tables, a `tiles` table keyed by (level, idx) into
    one keyed by `tile_id`; nothing to do for a log that has neither."""
    old = {r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)", OLD_TABLES)}
    old_tiles = "level" in {r[1] for r in db.execute("PRAGMA table_info(tiles)")}
    if not old and not old_tiles:
        return
    db.create_function("pag_prefix", 1, lambda b: prefix(bytes(b)), deterministic=True)
    db.create_function("pag_key_prefix", 1, key_prefix, deterministic=True)
    db.execute("BEGIN IMMEDIATE")
    try:
        if old_tiles:
            db.execute("CREATE TABLE tiles_by_id (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
            db.execute("INSERT INTO tiles_by_id (id, data) "
                       "SELECT (level << 56) | idx, data FROM tiles ORDER BY level, idx")
            db.execute("DROP TABLE tiles")
            db.execute("ALTER TABLE tiles_by_id RENAME TO tiles")
        if "leaves" in old:
            db.execute("INSERT OR IGNORE INTO leaf_prefixes (prefix, idx) "
                       "SELECT pag_prefix(hash), idx FROM leaves ORDER BY 1, 2")
            db.execute("DROP TABLE leaves")
        if "lookup" in old:
            db.execute("INSERT OR IGNORE INTO lookup_prefixes (prefix, idx) "
                       "SELECT pag_key_prefix(key), idx FROM lookup ORDER BY 1, 2")
            db.execute("DROP TABLE lookup")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class SQLiteStore:
    """tlog.storage.Storage on one SQLite database; safe across threads.

    Writes go through one connection; reads use a second one so that WAL lets
    them run while a write transaction is being fsynced.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self._lock_fd = lock_exclusive(path.with_suffix(".lock"))
        try:
            self._db = connect_durable(path, SCHEMA)
            self._db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            migrate(self._db)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._lock = threading.Lock()
        self._rdb = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._rdb.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
        self._rlock = threading.Lock()
        self._path = path
        self._inode = os.stat(path).st_ino
        self._absent: set[bytes] = set()
        self._closing = threading.Event()
        self._pace = Pace()  # when the checkpoint thread folds the WAL back
        self._checkpointer: threading.Thread | None = None
        try:
            with self._reading() as db:
                row = db.execute("SELECT count, below FROM folds").fetchone()
            if row is None:  # no piece written yet (each writes the row), the young tables
                self._folds = 0  # empty: the stored index covers a prefix of the log
                below = self._after_last("leaf_prefixes")
            else:
                self._folds, below = row
            self._memory = Memory(below)
            self._catch_up()
            checkpoints = sqlite3.connect(str(path), isolation_level=None,
                                          check_same_thread=False)
        except BaseException:
            self.close()
            raise
        self._checkpointer = threading.Thread(target=_checkpoints,
                                              args=(checkpoints, self._closing, self._pace),
                                              name="tlog-checkpoint", daemon=True)
        self._checkpointer.start()
        weakref.finalize(self, self._closing.set)  # a store never closed still ends it

    def _catch_up(self) -> None:
        """Rebuild the memory rows from the entries the stored index does not cover (those
        from `Memory.below`; after a crash, a fold in progress is written again). A log
        that `Memory.behind` (its stored index lacks many entries: written before the index,
        or by an older version) is folded here, one transaction per fold."""
        size = self.size()
        memory = self._memory
        while memory.end < size:
            start = memory.end
            end = min(size, start + INDEX_CHUNK)
            entries = self.read_entries(start, end)
            if len(entries) != end - start:
                raise StorageError(f"entries in [{start}, {end}) are missing below size {size}")
            self._index(start, [merkle.leaf_hash(e) for e in entries], entries)

    def _index(self, start: int, hashes: Sequence[bytes], entries: Sequence[bytes]) -> None:
        """Add the rows of stored entries [start, start + len(hashes)) to memory."""
        memory = self._memory
        memory.add(start + len(hashes), [(prefix(h), start + i) for i, h in enumerate(hashes)],
                   [(key_prefix(k), start + i) for i, e in enumerate(entries)
                    if (k := lookup_key(e)) is not None])
        if memory.behind():
            if memory.draining is None:
                memory.start_fold()
            pieces = memory.pieces_due()
            with self._writing() as db:
                for k in pieces:
                    self._write_piece(db, k)
            self._pieces_written(len(pieces))

    def _write_piece(self, db: sqlite3.Connection, k: int) -> None:
        """Piece `k` of the fold in progress (in the caller's transaction): its rows in
        the k-th key range into the young tables, then piece `k` of this fold's slice of
        the young tables into the main ones; the count of folds and the entries the stored
        index covers (every piece writes them, so young rows never exist without them)."""
        memory = self._memory
        lo, hi = slice_bounds((self._folds % SLICES) * PIECES + k, SLICES * PIECES)
        for table, rows in zip(INDEXES, memory.piece_rows(k), strict=True):
            db.executemany(f"INSERT OR IGNORE INTO young_{table} (prefix, idx) VALUES (?, ?)",  # noqa: S608 - fixed names
                           rows)
            db.execute(f"INSERT OR IGNORE INTO {table} (prefix, idx) SELECT prefix, idx "  # noqa: S608
                       f"FROM young_{table} WHERE prefix BETWEEN ? AND ?", (lo, hi))
            db.execute(f"DELETE FROM young_{table} WHERE prefix BETWEEN ? AND ?", (lo, hi))  # noqa: S608
        last = k == PIECES - 1
        db.execute("INSERT OR REPLACE INTO folds (id, count, below) VALUES (0, ?, ?)",
                   (self._folds + last, memory.drain_end if last else memory.below))

    def _pieces_written(self, count: int) -> None:
        """After the commit of `count` pieces of the fold in progress."""
        for _ in range(count):
            self._memory.piece_written()
            if self._memory.draining is None:
                self._folds += 1

    @contextlib.contextmanager
    def _writing(self, weight: int = 1) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (fsynced) on return, rolled back on any error;
        a failure of the database or file system raises StorageError. Its `weight` counts
        toward the checkpoint thread's pace."""
        with self._lock:
            db = self._db
            try:
                if db.in_transaction:  # left open by a rollback that failed
                    db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                    self._pace.committed(weight)
                except BaseException:
                    if db.in_transaction:  # SQLite may have rolled back itself (disk full)
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as e:
                raise StorageError(f"{self._path.name}: write failed: {e}") from e

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._rlock:
            try:
                yield self._rdb
            except (sqlite3.Error, OSError) as e:
                raise StorageError(f"{self._path.name}: read failed: {e}") from e

    def _after_last(self, table: str) -> int:
        """One past the highest `idx` in `table` (one of SCHEMA's), 0 if empty."""
        with self._reading() as db:
            row = db.execute(f"SELECT MAX(idx) FROM {table}").fetchone()  # noqa: S608 - fixed name
        return 0 if row[0] is None else row[0] + 1

    def fence(self, token: int) -> None:
        """Nothing to do: the file lock already makes this the only writer."""

    def ping(self) -> None:
        """The file on disk is still the one opened (not deleted or replaced) and answers."""
        try:
            inode = os.stat(self._path).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            raise StorageError(f"{self._path} was replaced or deleted while open")
        with self._reading() as db:
            db.execute("SELECT size FROM checkpoints ORDER BY size DESC LIMIT 1")

    def size(self) -> int:
        return self._after_last("entries")

    def head(self) -> Head | None:
        heads = self.recent(1)
        return heads[0] if heads else None

    def recent(self, count: int, below: int | None = None) -> list[Head]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT size, root, note FROM checkpoints WHERE ? IS NULL OR size < ? "
                "ORDER BY size DESC LIMIT ?", (below, below, count)).fetchall()
        return [Head(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    def read_tile(self, level: int, index: int) -> bytes:
        with self._reading() as db:
            row = db.execute("SELECT data FROM tiles WHERE id = ?",
                             (tile_id(level, index),)).fetchone()
        return b"" if row is None else bytes(row[0])

    def read_inner(self, index: int) -> bytes:
        with self._reading() as db:
            row = db.execute("SELECT data FROM tile_inner WHERE idx = ?", (index,)).fetchone()
        return b"" if row is None else bytes(row[0])

    def read_entries(self, start: int, end: int) -> list[bytes]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def persist(self, start: int, entries: Sequence[bytes], hashes: Sequence[bytes],
                tiles: dict[tuple[int, int], bytes], keys: Sequence[tuple[str, int]],
                head: Head | None = None) -> None:
        """The entries' index rows join those held in memory (tlog/recent.py). While a
        fold is in progress, this transaction also writes its next piece; all the rest of
        it if another FOLD_AT entries' rows have filled meanwhile."""
        memory = self._memory
        if memory.due():
            memory.start_fold()
        pieces = memory.pieces_due()
        with self._writing(1 + sum(map(len, entries)) // BYTES_PER_WEIGHT) as db:
            unchecked = [h for h in hashes if h not in self._absent]
            self._absent = set()
            if len(set(hashes)) != len(hashes) or (unchecked and self._held(db, unchecked)):
                raise StorageError("persist: the log already holds one of these entries")
            db.executemany("INSERT INTO entries (idx, data) VALUES (?, ?)",
                           ((start + i, e) for i, e in enumerate(entries)))
            db.executemany("INSERT OR REPLACE INTO tiles (id, data) VALUES (?, ?)",
                           ((tile_id(lv, ix), d) for (lv, ix), d in tiles.items()))
            db.executemany("INSERT OR REPLACE INTO tile_inner (idx, data) VALUES (?, ?)",
                           inner_rows(tiles))
            for k in pieces:
                self._write_piece(db, k)
            if head is not None:
                _insert_checkpoint(db, head)
        self._pieces_written(len(pieces))
        memory.add(start + len(entries), [(prefix(h), start + i) for i, h in enumerate(hashes)],
                   [(key_prefix(k), ix) for k, ix in keys])

    def find_leaves(self, hashes: Sequence[bytes]) -> dict[bytes, int]:
        """Through the writing connection: its page cache, unlike the reading one's, stays
        valid across its own commits, and the index pages it reads are those the next
        `persist` writes. Remembers which it found absent: until the next `persist` (the
        only writer of entries) they stay absent, so that one need not look again."""
        with self._lock:
            try:
                found = self._held(self._db, hashes)
                self._absent = {h for h in hashes if h not in found}
                return found
            except (sqlite3.Error, OSError) as e:
                raise StorageError(f"{self._path.name}: read failed: {e}") from e

    def _held(self, db: sqlite3.Connection, hashes: Sequence[bytes]) -> dict[bytes, int]:
        """The lowest index of each of these leaf hashes among the stored entries, found by
        prefix in the stored index and in memory, and confirmed by the entry's own leaf
        hash."""
        wanted: dict[int, set[bytes]] = {}
        for h in hashes:
            wanted.setdefault(prefix(h), set()).add(h)
        found = _held_stored(db, wanted)
        candidates = sorted(self._memory.leaf_indices(wanted))
        for i in range(0, len(candidates), IN_LIST):
            part = candidates[i:i + IN_LIST]
            sql = f"SELECT idx, data FROM entries WHERE idx IN ({','.join('?' * len(part))})"  # noqa: S608
            for ix, data in db.execute(sql, part):
                h = merkle.leaf_hash(bytes(data))
                if h in wanted.get(prefix(h), ()) and ix < found.get(h, ix + 1):
                    found[h] = ix
        return found

    def leaves_indexed(self) -> int:
        """Entries below this one are indexed, in storage or in memory."""
        return self._memory.end

    def index_leaves(self, start: int, hashes: Sequence[bytes]) -> None:
        """Entries stored behind this store's back (an older version's appends): indexed
        like appended ones. The store indexes everything stored when it opens."""
        if start != self._memory.end:
            raise StorageError(f"index_leaves: entries from {self._memory.end} are not indexed, "
                               f"not from {start}")
        self._index(start, hashes, self.read_entries(start, start + len(hashes)))

    def inner_held(self) -> int:
        return self._after_last("tile_inner")

    def store_inner(self, start: int, rows: Sequence[bytes]) -> None:
        with self._writing() as db:
            db.executemany("INSERT OR IGNORE INTO tile_inner (idx, data) VALUES (?, ?)",
                           ((start + i, r) for i, r in enumerate(rows)))

    def checkpoint(self, head: Head) -> None:
        with self._writing() as db:
            _insert_checkpoint(db, head)

    def update_note(self, size: int, note_bytes: bytes) -> None:
        with self._writing() as db:
            db.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (note_bytes, size))

    def checkpoint_note(self, size: int) -> bytes | None:
        with self._reading() as db:
            row = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        return None if row is None else bytes(row[0])

    def lookup(self, key: str) -> int | None:
        """The newest entry under the key's prefix whose own lookup key is `key`: among
        the rows in memory (all newer than the stored ones), else the stored rows. Memory
        is read first: a fold empties it only after its rows are committed."""
        p = key_prefix(key)
        recent = sorted(self._memory.key_indices(p), reverse=True)
        with self._reading() as db:
            for ix in recent:
                row = db.execute("SELECT data FROM entries WHERE idx = ?", (ix,)).fetchone()
                if row is not None and lookup_key(bytes(row[0])) == key:
                    return ix
            rows = db.execute(
                "SELECT l.idx, e.data FROM (SELECT idx FROM lookup_prefixes WHERE prefix = ? "
                "UNION ALL SELECT idx FROM young_lookup_prefixes WHERE prefix = ?) l "
                "JOIN entries e ON e.idx = l.idx ORDER BY l.idx DESC", (p, p))
            for idx, data in rows:
                if lookup_key(bytes(data)) == key:
                    return idx
        return None

    def close(self) -> None:
        self._closing.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        with self._lock, self._rlock:
            self._db.close()
            self._rdb.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def _insert_checkpoint(db: sqlite3.Connection, head: Head) -> None:
    db.execute("INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)",
               (head.size, head.root, head.note))


def _checkpoints(db: sqlite3.Connection, closing: threading.Event, pace: Pace) -> None:
    """A passive checkpoint at a tick of CHECKPOINT_EVERY once `pace` says one is due, until
    `closing` is set (the checkpoint thread; it holds no reference to its store). One that
    fails (disk full) waits until the pace is due again; the WAL meanwhile keeps every
    commit, and past WAL_PAGES the committing thread checkpoints too."""
    try:
        while not closing.wait(CHECKPOINT_EVERY):
            if not pace.due():
                continue
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        db.close()


def _held_stored(db: sqlite3.Connection, wanted: dict[int, set[bytes]]) -> dict[bytes, int]:
    """The lowest index of each wanted leaf hash (by its prefix) in the stored index,
    confirmed by the entry's own leaf hash."""
    found: dict[bytes, int] = {}
    keys = list(wanted)
    for i in range(0, len(keys), IN_LIST):
        part = keys[i:i + IN_LIST]
        marks = ",".join("?" * len(part))
        sql = ("SELECT l.prefix, l.idx, e.data FROM (SELECT prefix, idx FROM leaf_prefixes "  # noqa: S608
               f"WHERE prefix IN ({marks}) UNION ALL SELECT prefix, idx FROM young_leaf_prefixes "
               f"WHERE prefix IN ({marks})) l JOIN entries e ON e.idx = l.idx ORDER BY l.idx")
        for p, ix, data in db.execute(sql, part + part):
            h = merkle.leaf_hash(bytes(data))
            if h in wanted[p] and h not in found:
                found[h] = ix
    return found
