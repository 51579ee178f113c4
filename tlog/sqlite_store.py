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
"""
"""`tiles` holds hash tiles by `tile_id`, `tile_inner` each full leaf tile's inner row by
its index (tlog/storage.py); `leaf_prefixes` is the leaf index, `lookup_prefixes` the
request-hash lookup, both by `prefix`, confirmed against the entry."""

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
        with self._writing() as db:
            if len(set(hashes)) != len(hashes) or _held(db, hashes):
                raise StorageError("persist: the log already holds one of these entries")
            db.executemany("INSERT INTO entries (idx, data) VALUES (?, ?)",
                           ((start + i, e) for i, e in enumerate(entries)))
            db.executemany("INSERT INTO leaf_prefixes (prefix, idx) VALUES (?, ?)",
                           ((prefix(h), start + i) for i, h in enumerate(hashes)))
            db.executemany("INSERT OR REPLACE INTO tiles (id, data) VALUES (?, ?)",
                           ((tile_id(lv, ix), d) for (lv, ix), d in tiles.items()))
            db.executemany("INSERT OR REPLACE INTO tile_inner (idx, data) VALUES (?, ?)",
                           inner_rows(tiles))
            db.executemany("INSERT OR IGNORE INTO lookup_prefixes (prefix, idx) VALUES (?, ?)",
                           ((key_prefix(k), ix) for k, ix in keys))

    def find_leaves(self, hashes: Sequence[bytes]) -> dict[bytes, int]:
        """Through the writing connection: its page cache, unlike the reading one's, stays
        valid across its own commits, and the index pages it reads are those the next
        `persist` writes."""
        with self._lock:
            try:
                return _held(self._db, hashes)
            except (sqlite3.Error, OSError) as e:
                raise StorageError(f"{self._path.name}: read failed: {e}") from e

    def leaves_indexed(self) -> int:
        return self._after_last("leaf_prefixes")

    def index_leaves(self, start: int, hashes: Sequence[bytes]) -> None:
        with self._writing() as db:
            db.executemany("INSERT OR IGNORE INTO leaf_prefixes (prefix, idx) VALUES (?, ?)",
                           ((prefix(h), start + i) for i, h in enumerate(hashes)))

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


def _held(db: sqlite3.Connection, hashes: Sequence[bytes]) -> dict[bytes, int]:
    """The lowest index of each of these leaf hashes among the stored entries, found by
    prefix and confirmed by the entry's own leaf hash."""
    wanted: dict[int, set[bytes]] = {}
    for h in hashes:
        wanted.setdefault(prefix(h), set()).add(h)
    found: dict[bytes, int] = {}
    keys = list(wanted)
    for i in range(0, len(keys), IN_LIST):
        part = keys[i:i + IN_LIST]
        marks = ",".join("?" * len(part))
        sql = ("SELECT l.prefix, l.idx, e.data FROM leaf_prefixes l "  # noqa: S608
               f"JOIN entries e ON e.idx = l.idx WHERE l.prefix IN ({marks}) ORDER BY l.idx")
        for p, ix, data in db.execute(sql, part):
            h = merkle.leaf_hash(bytes(data))
            if h in wanted[p] and h not in found:
                found[h] = ix
    return found
