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
`key_prefix` of the request hash), not by the whole hash: their rows are a third of the size, so a batch's inserts
dirty fewer pages and its COMMIT writes fewer. A prefix is not unique (64-bit
prefix collisions take ~2^32 work to find), so nothing rests on it: every
prefix hit is confirmed against the stored entry itself (its leaf hash, its
lookup key), and `persist` refuses an entry whose leaf hash a confirmed row
holds. A log written before these tables (`leaves` keyed by hash, `lookup`
by hex key) is migrated on open, in one transaction.

Each entry is in one of the two: an entry with a lookup key (a receipt) only in
the lookup index, where its duplicates are found too (the same bytes have the
same key), one without only in the leaf index. Once an index outgrows the
cache, each insert dirties about one page, so at 1M entries this halved the
storage CPU per appended receipt (25 -> 13 us in 4,096-entry batches; 10M: 38
-> 20 us). `meta` row `leaves_indexed` says how far the two are complete, row
`keyed_in_leaves` below which index entries with a key are in the leaf index
too: a log from before `meta` put every entry there, so it gets both rows on
open (one past its highest indexed entry), and its keyed entries are still
found if the lookup index lacks one.

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
from collections.abc import Iterator, Sequence
from pathlib import Path

from tlog import merkle
from tlog.service import connect_durable, lock_exclusive
from tlog.storage import Head, StorageError, inner_rows, lookup_key

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
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
"""
"""`tiles` holds hash tiles by `tile_id`, `tile_inner` each full leaf tile's inner row by
its index (tlog/storage.py); `lookup_prefixes` indexes the entries with a lookup key (by
`key_prefix`), `leaf_prefixes` those without one (by `prefix` of the leaf hash), each row
confirmed against the entry; `meta` row `leaves_indexed` is the index below which every
entry is in one of them, `keyed_in_leaves` the one below which keyed entries are in
`leaf_prefixes` too (`mark_indexed`)."""

OLD_TABLES = ("leaves", "lookup")
"""The indexes of logs written before the prefix tables; `migrate` replaces them."""

WRITER_CACHE_KIB = 32768
"""Page cache of the writing connection (SQLite's default is 2 MiB): the index pages a
batch touches stay cached for the next one."""

WAL_PAGES = 10000
"""Pages the WAL may hold before a commit copies them back into the database (SQLite's
default is 1000): the random index pages that every batch dirties are copied once per ~40
MiB of commits instead of once per batch. Durability is the same; commits still fsync."""

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


def mark_indexed(db: sqlite3.Connection) -> int:
    """Give a log its `meta` rows if it lacks them (one statement, idempotent); its
    `keyed_in_leaves`.

    A log written before `meta` put every entry in `leaf_prefixes`, in index order, so
    the entries below one past its highest index there are all indexed, the keyed ones
    in both indexes; a new log starts both rows at 0."""
    db.execute("INSERT OR IGNORE INTO meta (k, v) SELECT k, v FROM "
               "(SELECT 'leaves_indexed' AS k UNION ALL SELECT 'keyed_in_leaves'), "
               "(SELECT COALESCE(MAX(idx) + 1, 0) AS v FROM leaf_prefixes)")
    return db.execute("SELECT v FROM meta WHERE k = 'keyed_in_leaves'").fetchone()[0]


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
            self._keyed_in_leaves = mark_indexed(self._db)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._lock = threading.Lock()
        self._rdb = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._rlock = threading.Lock()
        self._path = path
        self._inode = os.stat(path).st_ino

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (fsynced) on return, rolled back on any error;
        a failure of the database or file system raises StorageError."""
        with self._lock:
            db = self._db
            try:
                if db.in_transaction:  # left open by a rollback that failed
                    db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
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

    def persist(self, start: int, entries: Sequence[bytes], tiles: dict[tuple[int, int], bytes],
                keys: Sequence[tuple[str, int]]) -> None:
        hashes = [merkle.leaf_hash(e) for e in entries]
        keyed = {ix - start: k for k, ix in keys}
        kps = _key_prefixes([keyed.get(i) for i in range(len(entries))])
        with self._writing() as db:
            held = _held(db, hashes, kps, self._keyed_in_leaves)
            if len(set(hashes)) != len(hashes) or held:
                raise StorageError("persist: the log already holds one of these entries")
            db.executemany("INSERT INTO entries (idx, data) VALUES (?, ?)",
                           ((start + i, e) for i, e in enumerate(entries)))
            db.executemany("INSERT INTO leaf_prefixes (prefix, idx) VALUES (?, ?)",
                           ((prefix(h), start + i) for i, h in enumerate(hashes)
                            if kps[i] is None))
            db.executemany("INSERT OR REPLACE INTO tiles (id, data) VALUES (?, ?)",
                           ((tile_id(lv, ix), d) for (lv, ix), d in tiles.items()))
            db.executemany("INSERT OR REPLACE INTO tile_inner (idx, data) VALUES (?, ?)",
                           inner_rows(tiles))
            db.executemany("INSERT OR IGNORE INTO lookup_prefixes (prefix, idx) VALUES (?, ?)",
                           ((kp, start + i) for i, kp in enumerate(kps) if kp is not None))
            _advance(db, start, start + len(entries))

    def find_leaves(self, hashes: Sequence[bytes],
                    keys: Sequence[str | None]) -> dict[bytes, int]:
        """Through the writing connection: its page cache, unlike the reading one's, stays
        valid across its own commits, and the index pages it reads are those the next
        `persist` writes."""
        with self._lock:
            try:
                return _held(self._db, hashes, _key_prefixes(keys), self._keyed_in_leaves)
            except (sqlite3.Error, OSError) as e:
                raise StorageError(f"{self._path.name}: read failed: {e}") from e

    def leaves_indexed(self) -> int:
        with self._reading() as db:
            row = db.execute("SELECT v FROM meta WHERE k = 'leaves_indexed'").fetchone()
        return 0 if row is None else row[0]

    def index_leaves(self, start: int, hashes: Sequence[bytes],
                     keys: Sequence[str | None]) -> None:
        with self._writing() as db:
            kps = _key_prefixes(keys)
            db.executemany("INSERT OR IGNORE INTO leaf_prefixes (prefix, idx) VALUES (?, ?)",
                           ((prefix(h), start + i) for i, h in enumerate(hashes)
                            if kps[i] is None))
            db.executemany("INSERT OR IGNORE INTO lookup_prefixes (prefix, idx) VALUES (?, ?)",
                           ((kp, start + i) for i, kp in enumerate(kps) if kp is not None))
            _advance(db, start, start + len(hashes))

    def inner_held(self) -> int:
        return self._after_last("tile_inner")

    def store_inner(self, start: int, rows: Sequence[bytes]) -> None:
        with self._writing() as db:
            db.executemany("INSERT OR IGNORE INTO tile_inner (idx, data) VALUES (?, ?)",
                           ((start + i, r) for i, r in enumerate(rows)))

    def checkpoint(self, head: Head) -> None:
        with self._writing() as db:
            db.execute("INSERT INTO checkpoints (size, root, note) VALUES (?, ?, ?)",
                       (head.size, head.root, head.note))

    def update_note(self, size: int, note_bytes: bytes) -> None:
        with self._writing() as db:
            db.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (note_bytes, size))

    def checkpoint_note(self, size: int) -> bytes | None:
        with self._reading() as db:
            row = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        return None if row is None else bytes(row[0])

    def lookup(self, key: str) -> int | None:
        """The newest entry under the key's prefix whose own lookup key is `key`."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT l.idx, e.data FROM lookup_prefixes l JOIN entries e ON e.idx = l.idx "
                "WHERE l.prefix = ? ORDER BY l.idx DESC", (key_prefix(key),))
            for idx, data in rows:
                if lookup_key(bytes(data)) == key:
                    return idx
        return None

    def close(self) -> None:
        with self._lock, self._rlock:
            self._db.close()
            self._rdb.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def _key_prefixes(keys: Sequence[str | None]) -> list[int | None]:
    """`key_prefix` of each lookup key, None for an entry without one."""
    return [None if k is None else key_prefix(k) for k in keys]


def _advance(db: sqlite3.Connection, start: int, end: int) -> None:
    """Move `leaves_indexed` to `end` if the entries below `start` were all indexed (it
    never passes an entry that is in neither index)."""
    db.execute("UPDATE meta SET v = MAX(v, ?) WHERE k = 'leaves_indexed' AND v >= ?",
               (end, start))


def _held(db: sqlite3.Connection, hashes: Sequence[bytes], kps: Sequence[int | None],
          keyed_in_leaves: int) -> dict[bytes, int]:
    """The lowest index of each of these leaf hashes among the stored entries. The entry
    of `hashes[i]` is looked for under its lookup key's `kps[i]` in `lookup_prefixes` or,
    without one, under its leaf hash in `leaf_prefixes` (where `persist` put it: the same
    bytes always have the same key); a keyed one not found there also in `leaf_prefixes`
    if the log has keyed entries in it (`keyed_in_leaves`). Each hit is confirmed by the
    entry's own leaf hash."""
    by_leaf: dict[int, set[bytes]] = {}
    by_key: dict[int, set[bytes]] = {}
    for h, kp in zip(hashes, kps, strict=True):
        if kp is None:
            by_leaf.setdefault(prefix(h), set()).add(h)
        else:
            by_key.setdefault(kp, set()).add(h)
    found = _probe(db, "lookup_prefixes", by_key)
    if keyed_in_leaves:
        for hs in by_key.values():
            for h in hs - found.keys():
                by_leaf.setdefault(prefix(h), set()).add(h)
    return _probe(db, "leaf_prefixes", by_leaf) | found


def _probe(db: sqlite3.Connection, table: str, wanted: dict[int, set[bytes]]) -> dict[bytes, int]:
    """The lowest index of each hash in `wanted` (by its index key) that `table` (a prefix
    index) points at, confirmed by the entry's own leaf hash."""
    found: dict[bytes, int] = {}
    ps = list(wanted)
    for i in range(0, len(ps), IN_LIST):
        part = ps[i:i + IN_LIST]
        marks = ",".join("?" * len(part))
        sql = (f"SELECT l.prefix, l.idx, e.data FROM {table} l "  # noqa: S608 - fixed names
               f"JOIN entries e ON e.idx = l.idx WHERE l.prefix IN ({marks}) ORDER BY l.idx")
        for p, ix, data in db.execute(sql, part):
            h = merkle.leaf_hash(bytes(data))
            if h in wanted[p] and h not in found:
                found[h] = ix
    return found
