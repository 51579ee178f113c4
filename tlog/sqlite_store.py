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
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from tlog import merkle
from tlog.service import connect_durable, lock_exclusive
from tlog.storage import Head, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tiles (level INTEGER, idx INTEGER, data BLOB NOT NULL,
                                  PRIMARY KEY (level, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL,
                                        note BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lookup (key TEXT NOT NULL, idx INTEGER NOT NULL,
                                   PRIMARY KEY (key, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leaves (hash BLOB PRIMARY KEY, idx INTEGER NOT NULL) WITHOUT ROWID;
"""
"""`leaves` is the leaf index: each held entry's leaf hash, once (tlog/storage.py)."""

IN_LIST = 500
"""Leaf hashes looked up per query (SQLite limits the number of bound parameters)."""


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
        with self._reading() as db:
            row = db.execute("SELECT MAX(idx) FROM entries").fetchone()
        return 0 if row[0] is None else row[0] + 1

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
            row = db.execute(
                "SELECT data FROM tiles WHERE level = ? AND idx = ?", (level, index)
            ).fetchone()
        return b"" if row is None else bytes(row[0])

    def read_entries(self, start: int, end: int) -> list[bytes]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def persist(self, start: int, entries: Sequence[bytes], tiles: dict[tuple[int, int], bytes],
                keys: Sequence[tuple[str, int]]) -> None:
        with self._writing() as db:
            db.executemany("INSERT INTO entries (idx, data) VALUES (?, ?)",
                           ((start + i, e) for i, e in enumerate(entries)))
            db.executemany("INSERT INTO leaves (hash, idx) VALUES (?, ?)",
                           ((merkle.leaf_hash(e), start + i) for i, e in enumerate(entries)))
            db.executemany("INSERT OR REPLACE INTO tiles (level, idx, data) VALUES (?, ?, ?)",
                           ((lv, ix, d) for (lv, ix), d in tiles.items()))
            db.executemany("INSERT OR IGNORE INTO lookup (key, idx) VALUES (?, ?)", keys)

    def find_leaves(self, hashes: Sequence[bytes]) -> dict[bytes, int]:
        wanted = list(dict.fromkeys(hashes))
        found: dict[bytes, int] = {}
        with self._reading() as db:
            for i in range(0, len(wanted), IN_LIST):
                part = wanted[i:i + IN_LIST]
                marks = ",".join("?" * len(part))
                sql = f"SELECT hash, idx FROM leaves WHERE hash IN ({marks})"  # noqa: S608
                rows = db.execute(sql, part).fetchall()
                found.update((bytes(h), ix) for h, ix in rows)
        return found

    def leaves_indexed(self) -> int:
        with self._reading() as db:
            row = db.execute("SELECT MAX(idx) FROM leaves").fetchone()
        return 0 if row[0] is None else row[0] + 1

    def index_leaves(self, start: int, hashes: Sequence[bytes]) -> None:
        with self._writing() as db:
            db.executemany("INSERT OR IGNORE INTO leaves (hash, idx) VALUES (?, ?)",
                           ((h, start + i) for i, h in enumerate(hashes)))

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
        with self._reading() as db:
            row = db.execute("SELECT MAX(idx) FROM lookup WHERE key = ?", (key,)).fetchone()
        return row[0]

    def close(self) -> None:
        with self._lock, self._rlock:
            self._db.close()
            self._rdb.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
