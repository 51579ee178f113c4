"""PostgreSQL storage for the log (scale-out backend), same steps as SQLite.

Tables live in a schema named after nothing but the connection's search
path; one log per database (or per search path). Each write is one
transaction committed with synchronous_commit on, so it is durable on return.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import psycopg

from tlog.storage import Head, StorageError

CONNECT_TIMEOUT = 5
"""Seconds to wait for a connection before the database counts as unreachable."""


def one_line(e: BaseException) -> str:
    """The first line of a database error (psycopg's carry hints on further lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

SCHEMA = """
CREATE TABLE IF NOT EXISTS tlog_entries (idx BIGINT PRIMARY KEY, data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_tiles (level INT, idx BIGINT, data BYTEA NOT NULL,
                                       PRIMARY KEY (level, idx));
CREATE TABLE IF NOT EXISTS tlog_checkpoints (size BIGINT PRIMARY KEY, root BYTEA NOT NULL,
                                             note BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_lookup (key TEXT NOT NULL, idx BIGINT NOT NULL,
                                        PRIMARY KEY (key, idx));
"""


class PostgresStore:
    """tlog.storage.Storage on PostgreSQL (psycopg 3); safe across threads."""

    def __init__(self, url: str) -> None:
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
            self._db.execute("SET synchronous_commit = on")
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(7466726)")  # one schema creator
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    self._db.execute(stmt)
            self._rdb = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            raise StorageError(f"cannot use the database: {one_line(e)}") from None
        self._lock = threading.Lock()
        self._rlock = threading.Lock()

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        with self._rlock:
            return self._rdb.execute(sql, params).fetchone()

    def size(self) -> int:
        row = self._one("SELECT MAX(idx) FROM tlog_entries")
        return 0 if row is None or row[0] is None else row[0] + 1

    def head(self) -> Head | None:
        row = self._one("SELECT size, root, note FROM tlog_checkpoints ORDER BY size DESC LIMIT 1")
        return None if row is None else Head(row[0], bytes(row[1]), bytes(row[2]))

    def read_tile(self, level: int, index: int) -> bytes:
        row = self._one("SELECT data FROM tlog_tiles WHERE level = %s AND idx = %s", (level, index))
        return b"" if row is None else bytes(row[0])

    def read_entries(self, start: int, end: int) -> list[bytes]:
        with self._rlock:
            rows = self._rdb.execute(
                "SELECT data FROM tlog_entries WHERE idx >= %s AND idx < %s ORDER BY idx",
                (start, end)).fetchall()
        return [bytes(r[0]) for r in rows]

    def persist(self, start: int, entries: Sequence[bytes], tiles: dict[tuple[int, int], bytes],
                keys: Sequence[tuple[str, int]]) -> None:
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.executemany("INSERT INTO tlog_entries (idx, data) VALUES (%s, %s)",
                            [(start + i, e) for i, e in enumerate(entries)])
            cur.executemany(
                "INSERT INTO tlog_tiles (level, idx, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (level, idx) DO UPDATE SET data = EXCLUDED.data",
                [(lv, ix, d) for (lv, ix), d in tiles.items()])
            if keys:
                cur.executemany("INSERT INTO tlog_lookup (key, idx) VALUES (%s, %s) "
                                "ON CONFLICT DO NOTHING", list(keys))

    def checkpoint(self, head: Head) -> None:
        with self._lock, self._db.transaction():
            self._db.execute("INSERT INTO tlog_checkpoints (size, root, note) VALUES (%s, %s, %s)",
                             (head.size, head.root, head.note))

    def update_note(self, size: int, note_bytes: bytes) -> None:
        with self._lock, self._db.transaction():
            self._db.execute("UPDATE tlog_checkpoints SET note = %s WHERE size = %s",
                             (note_bytes, size))

    def checkpoint_note(self, size: int) -> bytes | None:
        row = self._one("SELECT note FROM tlog_checkpoints WHERE size = %s", (size,))
        return None if row is None else bytes(row[0])

    def lookup(self, key: str) -> int | None:
        row = self._one("SELECT MAX(idx) FROM tlog_lookup WHERE key = %s", (key,))
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock, self._rlock:
            self._db.close()
            self._rdb.close()
