"""PostgreSQL storage for the log (scale-out backend), same steps as SQLite.

Tables live in a schema named after nothing but the connection's search
path; one log per database (or per search path). Each write is one
transaction committed with synchronous_commit on, so it is durable on return.
Every database error (the connection dropped mid-transaction, the server
down or refusing) raises StorageError with nothing committed, and the broken
connection is reopened on its next use: when the database is back, the
store works again without a restart.
Several `tlog serve` processes may share the database: tlog/election.py
picks the one that writes, and this store fences every write with its token.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import psycopg

from tlog.storage import Fenced, Head, StorageError, inner_rows

CONNECT_TIMEOUT = 5
"""Seconds to wait for a connection before the database counts as unreachable."""


def one_line(e: BaseException) -> str:
    """The first line of a database error (psycopg's carry hints on further lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

SCHEMA = """
CREATE TABLE IF NOT EXISTS tlog_entries (idx BIGINT PRIMARY KEY, data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_tiles (level INT, idx BIGINT, data BYTEA NOT NULL,
                                       PRIMARY KEY (level, idx));
CREATE TABLE IF NOT EXISTS tlog_tile_inner (idx BIGINT PRIMARY KEY, data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_checkpoints (size BIGINT PRIMARY KEY, root BYTEA NOT NULL,
                                             note BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_lookup (key TEXT NOT NULL, idx BIGINT NOT NULL,
                                        PRIMARY KEY (key, idx));
CREATE TABLE IF NOT EXISTS tlog_leaves (hash BYTEA PRIMARY KEY, idx BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_sequencer (id INT PRIMARY KEY CHECK (id = 1),
                                           token BIGINT NOT NULL, holder TEXT NOT NULL,
                                           url TEXT NOT NULL, backend_pid INT NOT NULL,
                                           expires TIMESTAMPTZ NOT NULL);
INSERT INTO tlog_sequencer VALUES (1, 0, '', '', 0, '-infinity') ON CONFLICT DO NOTHING;
"""
"""`tlog_tile_inner` holds each full leaf tile's inner row, `tlog_leaves` is the leaf index
(each held entry's leaf hash, once), both as tlog/storage.py says; `tlog_sequencer` is the
one lease row of tlog/election.py; its `token` fences writes."""

STALLED_TRANSACTION = 10
"""Seconds after which PostgreSQL ends a write transaction left idle (a paused writer), so
the row lock its fencing check holds cannot keep a new sequencer out for longer."""


class PostgresStore:
    """tlog.storage.Storage on PostgreSQL (psycopg 3); safe across threads.

    Writes go through one connection, reads through another; either is
    reopened on the next use after it broke (a database restart costs the
    calls in flight, not the process). With a fencing token set (`fence`),
    every write transaction first reads the lease row FOR SHARE and commits
    nothing unless the token is still the current one (`Fenced`); the share
    lock makes a concurrent takeover wait for the transaction, so a write
    either commits before the new sequencer starts or not at all.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._token: int | None = None
        self._lock = threading.Lock()
        self._rlock = threading.Lock()
        try:
            self._db = self._connect(writer=True)
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(7466726)")  # one schema creator
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    self._db.execute(stmt)
            self._rdb = self._connect(writer=False)
        except psycopg.Error as e:
            raise StorageError(f"cannot use the database: {one_line(e)}") from None

    def _connect(self, *, writer: bool) -> psycopg.Connection:
        db = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        if writer:
            db.execute("SET synchronous_commit = on")
            db.execute(f"SET idle_in_transaction_session_timeout = '{STALLED_TRANSACTION}s'")
        return db

    @contextlib.contextmanager
    def _reading(self) -> Iterator[psycopg.Connection]:
        with self._rlock:
            try:
                if self._rdb.closed:
                    self._rdb = self._connect(writer=False)
                yield self._rdb
            except psycopg.Error as e:
                raise StorageError(f"database read failed: {type(e).__name__}: "
                                   f"{one_line(e)}") from e

    @contextlib.contextmanager
    def _writing(self) -> Iterator[psycopg.Cursor]:
        """One fenced write transaction; any database error raises StorageError."""
        with self._lock:
            try:
                if self._db.closed:
                    self._db = self._connect(writer=True)
                with self._db.transaction(), self._db.cursor() as cur:
                    if self._token is not None:
                        row = cur.execute("SELECT token FROM tlog_sequencer WHERE id = 1 "
                                          "FOR SHARE").fetchone()
                        if row is None or row[0] != self._token:
                            raise Fenced(f"sequencer lease token {self._token} is stale "
                                         f"(now {None if row is None else row[0]})")
                    yield cur
            except psycopg.Error as e:
                raise StorageError(f"database write failed: {type(e).__name__}: "
                                   f"{one_line(e)}") from e

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        with self._reading() as db:
            return db.execute(sql, params).fetchone()

    def _after_last(self, table: str) -> int:
        """One past the highest `idx` in `table` (one of this module's), 0 if empty."""
        row = self._one(f"SELECT MAX(idx) FROM {table}")  # noqa: S608 - a fixed table name
        return 0 if row is None or row[0] is None else row[0] + 1

    def fence(self, token: int) -> None:
        self._token = token

    def ping(self) -> None:
        self._one("SELECT size FROM tlog_checkpoints ORDER BY size DESC LIMIT 1")

    def size(self) -> int:
        return self._after_last("tlog_entries")

    def head(self) -> Head | None:
        heads = self.recent(1)
        return heads[0] if heads else None

    def recent(self, count: int, below: int | None = None) -> list[Head]:
        with self._reading() as db:
            rows = db.execute("SELECT size, root, note FROM tlog_checkpoints "
                              "WHERE %(below)s::bigint IS NULL OR size < %(below)s "
                              "ORDER BY size DESC LIMIT %(count)s",
                              {"below": below, "count": count}).fetchall()
        return [Head(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    def read_tile(self, level: int, index: int) -> bytes:
        row = self._one("SELECT data FROM tlog_tiles WHERE level = %s AND idx = %s", (level, index))
        return b"" if row is None else bytes(row[0])

    def read_inner(self, index: int) -> bytes:
        row = self._one("SELECT data FROM tlog_tile_inner WHERE idx = %s", (index,))
        return b"" if row is None else bytes(row[0])

    def read_entries(self, start: int, end: int) -> list[bytes]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT data FROM tlog_entries WHERE idx >= %s AND idx < %s ORDER BY idx",
                (start, end)).fetchall()
        return [bytes(r[0]) for r in rows]

    def persist(self, start: int, entries: Sequence[bytes], hashes: Sequence[bytes],
                tiles: dict[tuple[int, int], bytes], keys: Sequence[tuple[str, int]],
                head: Head | None = None) -> None:
        with self._writing() as cur:
            cur.executemany("INSERT INTO tlog_entries (idx, data) VALUES (%s, %s)",
                            [(start + i, e) for i, e in enumerate(entries)])
            cur.executemany("INSERT INTO tlog_leaves (hash, idx) VALUES (%s, %s)",
                            [(h, start + i) for i, h in enumerate(hashes)])
            cur.executemany(
                "INSERT INTO tlog_tiles (level, idx, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (level, idx) DO UPDATE SET data = EXCLUDED.data",
                [(lv, ix, d) for (lv, ix), d in tiles.items()])
            if inner := inner_rows(tiles):
                cur.executemany("INSERT INTO tlog_tile_inner (idx, data) VALUES (%s, %s) "
                                "ON CONFLICT (idx) DO UPDATE SET data = EXCLUDED.data", inner)
            if keys:
                cur.executemany("INSERT INTO tlog_lookup (key, idx) VALUES (%s, %s) "
                                "ON CONFLICT DO NOTHING", list(keys))
            if head is not None:
                _insert_checkpoint(cur, head)

    def find_leaves(self, hashes: Sequence[bytes]) -> dict[bytes, int]:
        with self._reading() as db:
            rows = db.execute("SELECT hash, idx FROM tlog_leaves WHERE hash = ANY(%s)",
                              (list(dict.fromkeys(hashes)),)).fetchall()
        return {bytes(h): ix for h, ix in rows}

    def leaves_indexed(self) -> int:
        return self._after_last("tlog_leaves")

    def index_leaves(self, start: int, hashes: Sequence[bytes]) -> None:
        with self._writing() as cur:
            cur.executemany("INSERT INTO tlog_leaves (hash, idx) VALUES (%s, %s) "
                            "ON CONFLICT (hash) DO NOTHING",
                            [(h, start + i) for i, h in enumerate(hashes)])

    def inner_held(self) -> int:
        return self._after_last("tlog_tile_inner")

    def store_inner(self, start: int, rows: Sequence[bytes]) -> None:
        with self._writing() as cur:
            cur.executemany("INSERT INTO tlog_tile_inner (idx, data) VALUES (%s, %s) "
                            "ON CONFLICT (idx) DO NOTHING",
                            [(start + i, r) for i, r in enumerate(rows)])

    def checkpoint(self, head: Head) -> None:
        with self._writing() as cur:
            _insert_checkpoint(cur, head)

    def update_note(self, size: int, note_bytes: bytes) -> None:
        with self._writing() as cur:
            cur.execute("UPDATE tlog_checkpoints SET note = %s WHERE size = %s",
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


def _insert_checkpoint(cur: psycopg.Cursor, head: Head) -> None:
    cur.execute("INSERT INTO tlog_checkpoints (size, root, note) VALUES (%s, %s, %s)",
                (head.size, head.root, head.note))
