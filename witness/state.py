"""The witness's durable state: the last cosigned (size, root) per log, and forks.

Updates are compare-and-swap in one SQLite transaction (WAL,
synchronous=FULL): a new size and root are committed only if the stored ones
are still the ones the request was checked against, and the commit is
fsynced before the witness answers.

Every failure of the database or its file system (disk full, read-only,
I/O error) raises StateError with nothing changed; the connection stays
usable, so the witness works again as soon as the file system does.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tlog.service import connect_durable

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (origin TEXT PRIMARY KEY, size INTEGER NOT NULL,
                                 root BLOB NOT NULL, note BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS forks (id INTEGER PRIMARY KEY, origin TEXT NOT NULL,
                                  size INTEGER NOT NULL, cosigned_note BLOB NOT NULL,
                                  conflicting_note BLOB NOT NULL, seen REAL NOT NULL);
"""


class StateError(RuntimeError):
    """The state database cannot be read or written now; the message is one line."""


class State:
    """Per-origin witness state in SQLite."""

    def __init__(self, path: str | Path) -> None:
        self._db = connect_durable(path, SCHEMA)
        self._lock = threading.Lock()
        self._path = Path(path)
        self._inode = os.stat(path).st_ino

    @contextlib.contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The connection, alone; database and file-system failures raise StateError."""
        with self._lock:
            try:
                yield self._db
            except (sqlite3.Error, OSError) as e:
                raise StateError(f"{self._path.name}: {e}") from e

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, fsynced on commit, rolled back on any error."""
        with self._using() as db:
            if db.in_transaction:  # left open by a rollback that failed
                db.execute("ROLLBACK")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                if db.in_transaction:
                    db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back itself (disk full)
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def get(self, origin: str) -> tuple[int, bytes | None]:
        """(size, root) last cosigned for `origin`; (0, None) if never."""
        with self._using() as db:
            row = db.execute("SELECT size, root FROM logs WHERE origin = ?",
                             (origin,)).fetchone()
        return (0, None) if row is None else (row[0], bytes(row[1]))

    def note(self, origin: str) -> bytes | None:
        """The last checkpoint note cosigned for `origin`."""
        with self._using() as db:
            row = db.execute("SELECT note FROM logs WHERE origin = ?", (origin,)).fetchone()
        return None if row is None else bytes(row[0])

    def advance(self, origin: str, old: tuple[int, bytes | None], size: int, root: bytes,
                note: bytes) -> bool:
        """Store (size, root) if the state is still `old`; False if it moved meanwhile."""
        with self._writing() as db:
            row = db.execute("SELECT size, root FROM logs WHERE origin = ?",
                             (origin,)).fetchone()
            current = (0, None) if row is None else (row[0], bytes(row[1]))
            if current != old:
                db.execute("ROLLBACK")
                return False
            db.execute("INSERT OR REPLACE INTO logs (origin, size, root, note) "
                       "VALUES (?, ?, ?, ?)", (origin, size, root, note))
        return True

    def record_fork(self, origin: str, size: int, cosigned: bytes, conflicting: bytes) -> None:
        """Keep both signed checkpoints of a fork: the one cosigned and the conflicting one."""
        with self._writing() as db:
            db.execute(
                "INSERT INTO forks (origin, size, cosigned_note, conflicting_note, seen) "
                "VALUES (?, ?, ?, ?, ?)", (origin, size, cosigned, conflicting, time.time()))

    def fork_count(self) -> int:
        """How many forks are recorded."""
        with self._using() as db:
            return db.execute("SELECT COUNT(*) FROM forks").fetchone()[0]

    def ping(self) -> None:
        """Raise unless the database on disk is the one opened and answers (readiness)."""
        try:
            inode = os.stat(self._path).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            raise StateError(f"{self._path} was replaced or deleted while open")
        with self._using() as db:
            db.execute("SELECT COUNT(*) FROM logs").fetchone()

    def forks(self) -> list[dict[str, object]]:
        """Recorded fork evidence."""
        with self._using() as db:
            rows = db.execute("SELECT origin, size, cosigned_note, conflicting_note, seen "
                                    "FROM forks ORDER BY id").fetchall()
        return [{"origin": o, "size": s, "cosigned": bytes(a).decode(errors="replace"),
                 "conflicting": bytes(b).decode(errors="replace"), "seen": t}
                for o, s, a, b, t in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
