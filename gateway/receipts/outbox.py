"""The durable receipt outbox and shipping ledger (SQLite), and the receipt signer.

Two database files in the data directory, each with exactly one writer:
- `outbox.sqlite3` (written by the gateway): every signed receipt.
- `ledger.sqlite3` (written by the shipper): the log's acknowledgement of each
  receipt (index and proof) and the shipper's state (is the log down).
Keeping the writers in separate files means the gateway's commits never wait
for the shipper's, even when the shipper runs in another process.

Invariants:
- `Outbox.put` returns only after the receipt's row is committed, so an
  acknowledged response's receipt survives kill -9 of the gateway.
- Durability "process" (default): commits run on the event loop thread in WAL
  mode with synchronous=NORMAL, one transaction per loop iteration for every
  write queued in it: a commit is in the OS page cache when `put` returns
  (survives any process crash, not a power cut).
- Durability "fsync": synchronous=FULL, and commits are grouped: one writer
  thread drains every queued write into a single transaction, so concurrent
  requests share one fsync (survives power loss too).
- Each receipt row records the SHA-256 of the API key that made the call
  (`key_sha256`), so `GET /v1/receipts/{id}` answers its owner only. Outbox
  files from before that column existed are migrated on open (ALTER TABLE ADD
  COLUMN); their old rows have no owner.
- A receipt counts as logged only once the ledger holds the index and proof the
  log returned. The stored proof omits its `extra` line (the entry, already
  stored) and gets it back when read.

Bounded disk (docs/reliability.md):
- The write-ahead log of each file is folded back by a background thread, at a tick
  of `CHECKPOINT_EVERY` once `tlog.walpace.WEIGHT` commits were made since it last
  did (tlog/walpace.py says why), and, once it passes `WAL_LIMIT`, restarted between
  two transactions (fully folded in, written again from its start and its file cut
  back to the limit), so it cannot grow under a steady load that never lets a
  passive checkpoint catch up. In "process" mode the checkpoint thread does the
  restart while the writer holds its next commits back (the event loop goes on
  serving); in "fsync" mode the writer thread does. A restart that readers
  keep from finishing is tried again `TRIM_RETRY` later, not at every commit.
- A receipt is pruned (deleted with its acknowledgement) only once it is logged
  and older than the retention, or sooner, oldest first, while the outbox is
  past its alarm level. A receipt the log has not acknowledged is never
  deleted. The newest receipt is always kept, so a receipt number is never
  reused. The outbox records how far it pruned (`health.pruned`); the shipper
  deletes acknowledgements up to there from its ledger.
- `admit` is the one place that decides whether a receipt can be kept now: no
  when the bytes in use reach `max_bytes` (`outbox_full`), or when the last write
  failed and a probe write still fails (`outbox_unavailable`). A call it refuses
  is forwarded nowhere and leaves no receipt, so a flood of refusals cannot grow
  the files; the refusal ends by itself when the shipper catches up or the disk
  recovers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.receipts.doorbell import Ringer
from tlog import proof
from tlog.walpace import Pace

OUTBOX_FILE = "outbox.sqlite3"
LEDGER_FILE = "ledger.sqlite3"
WAL_LIMIT = 32 << 20  # bytes of write-ahead log past which it is restarted (at most)
# (4 MiB truncated the outbox's WAL 4-7 times a second at 16 clients, on the event loop;
# 32 MiB: about once, and 12-16 % more calls a second: docs/benchmarks-history.md)
CHECKPOINT_EVERY = 0.1  # seconds between the checkpoint thread's looks at the WAL (walpace)
TRIM_WAIT = 0.05  # seconds a restart waits for readers of an older snapshot
TRIM_RETRY = 1.0  # seconds before a restart readers kept from finishing is tried again
MAX_BYTES = 1 << 30  # default hard bound on the bytes the outbox and ledger use
RETENTION = 7 * 86400  # default seconds a logged receipt stays readable by its owner
ALARM = 0.8  # fraction of max_bytes past which the outbox is "near its bound"
PRUNE_BATCH = 5000  # receipts deleted per transaction
USAGE_TTL = 0.25  # seconds a measured disk usage may be old
OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  request_hash TEXT NOT NULL,
  entry BLOB NOT NULL,
  key_sha256 TEXT,                  -- the caller's API key hash (NULL in outboxes made
                                    -- before owners were recorded: no owner can read them by id)
  t INTEGER                         -- Unix seconds of the commit (NULL before pruning existed)
);
CREATE INDEX IF NOT EXISTS receipts_request_hash ON receipts(request_hash, seq);
CREATE TABLE IF NOT EXISTS health (
  k TEXT PRIMARY KEY,
  v REAL NOT NULL
) WITHOUT ROWID;
"""
LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS logged (
  seq INTEGER PRIMARY KEY,          -- receipts.seq in outbox.sqlite3
  log_index INTEGER NOT NULL,
  proof BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
  k TEXT PRIMARY KEY,
  v TEXT NOT NULL
) WITHOUT ROWID;
"""
ROW = ("SELECT r.id, r.request_hash, r.entry, l.log_index, l.proof, r.key_sha256 "
       "FROM receipts r "
       "LEFT JOIN ledger.logged l ON l.seq = r.seq ")
DURABILITY = ("process", "fsync")
FILES = (OUTBOX_FILE, OUTBOX_FILE + "-wal", LEDGER_FILE, LEDGER_FILE + "-wal")


def wal_limit(max_bytes: int) -> int:
    """The WAL size past which it is restarted and cut back to: WAL_LIMIT, or a sixteenth of the
    bound if smaller (both WALs count toward the bound)."""
    return min(WAL_LIMIT, max_bytes // 16)


class OutboxUnavailable(Exception):
    """A receipt could not be committed (disk full, read-only, I/O error)."""


def canonical(obj: Any) -> bytes:
    """RFC 8785 bytes of a receipt-shaped object.

    Receipts hold only ASCII keys, strings, booleans, null and integers below
    2**53 (never floats); for such values sorted-key orjson output is byte for
    byte the RFC 8785 form (tests check this against `rfc8785`), at a fraction
    of the cost.
    """
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


class ReceiptSigner:
    """Signs receipt bodies exactly as `verifier.receipt.sign`, returning the log entry too.

    The body must follow the `canonical` value rules (no floats, ASCII keys).
    """

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes_raw()
        self._pub_b64 = base64.b64encode(self.public_key).decode()

    def sign(self, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """(signed receipt, RFC 8785 entry bytes); `body` must not hold `signature`."""
        sig = self._key.sign(canonical(body))
        signed = dict(body)
        signed["signature"] = {"alg": "ed25519", "key": self._pub_b64,
                               "sig": base64.b64encode(sig).decode()}
        return signed, canonical(signed)


@dataclass(frozen=True)
class Row:
    """One receipt; `log_index`/`proof` are None until the log acknowledged it."""

    id: str
    request_hash: str
    entry: bytes
    log_index: int | None
    proof: str | None
    key_sha256: str | None = None


class _Op(NamedTuple):
    """One queued write."""

    sql: str
    args: Any  # a row, or (`many`) a list of rows for `executemany`
    many: bool
    done: Callable[[BaseException | None], None]  # called with the outcome


_CUT = _Op("PRAGMA user_version = 0", (), False, lambda err: None)
"""A commit of one page and nothing else: the first commit after a WAL restart cuts the
file back to the limit, and this one is made when no other write comes."""


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():  # the waiter was cancelled; the write is committed regardless
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def _connect(path: Path, schema: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in a new file only
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(schema)
    if schema == OUTBOX_SCHEMA:
        _migrate_outbox(conn)
    return conn


def _migrate_outbox(conn: sqlite3.Connection) -> None:
    """Add the columns later versions introduced to an older outbox file (one transaction)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cols = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
        if "key_sha256" not in cols:
            conn.execute("ALTER TABLE receipts ADD COLUMN key_sha256 TEXT")
        if "t" not in cols:
            conn.execute("ALTER TABLE receipts ADD COLUMN t INTEGER")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


FaultHook = Callable[[str], None]  # called with "begin", "write", "commit", "committed"


class _Writer:
    """The single writer of one SQLite file: batched commits, checkpoints off the loop.

    `faults`, if set, is called before each step of a transaction and after its
    commit; what it raises is that step failing (tests inject disk faults here)."""

    def __init__(self, path: Path, schema: str, durability: str,
                 wal_limit: int = WAL_LIMIT) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._wconn = _connect(path, schema)
        self._wconn.execute("PRAGMA synchronous=" +
                            ("FULL" if durability == "fsync" else "NORMAL"))
        self._wconn.execute("PRAGMA wal_autocheckpoint=0")
        self._wal_limit = wal_limit
        self._wconn.execute(f"PRAGMA journal_size_limit={wal_limit}")
        self._wal = Path(f"{path}-wal")
        self.faults: FaultHook | None = None
        self.committed: Callable[[], None] | None = None  # after each committed batch, its
        # writes' callers told (on the loop: their tasks are due to resume)
        self.vacuum_due = False  # set after deletions: free pages go back to the file system
        self._closing = threading.Event()
        self._trim_asked = threading.Event()
        self._handback: Callable[[], None] | None = None  # set by the loop, run by the thread
        self._holding = False  # (on the loop) commits wait for a restart
        self._trim_after = 0.0  # monotonic time before which no restart is tried
        self._pace = Pace()  # when the checkpoint thread folds the WAL back
        self._checkpointer = threading.Thread(target=self._checkpoint, daemon=True,
                                              name=f"{path.stem}-checkpoint")
        self._checkpointer.start()
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._pending: list[_Op] = []
        self._thread: threading.Thread | None = None
        if durability == "fsync":
            self._thread = threading.Thread(target=self._writer, daemon=True,
                                            name=f"{path.stem}-writer")
            self._thread.start()

    def _checkpoint(self) -> None:
        """Fold the WAL into the database at a tick of CHECKPOINT_EVERY once the writer made
        enough commits (`Pace`), on this thread's own connection; when the writer asks
        (`_trim_wal`), restart it instead, then hand the writer its commits back."""
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=TRIM_WAIT)
        try:
            while not self._closing.is_set():
                self._trim_asked.wait(CHECKPOINT_EVERY)
                self._trim_asked.clear()
                handback, self._handback = self._handback, None
                if handback is not None:
                    try:
                        self._restart(conn)
                    finally:
                        with contextlib.suppress(RuntimeError):  # the loop has closed
                            handback()
                elif self._pace.due():
                    with contextlib.suppress(sqlite3.Error):  # a full disk: when next due
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def _restart(self, conn: sqlite3.Connection) -> bool:
        """Fold the rest of the WAL in so that the next commit writes it from its start
        again and cuts the file back to the limit (`journal_size_limit`); whether that
        finished. It waits at most TRIM_WAIT for readers of an older snapshot; if they keep
        it from finishing, none is tried for TRIM_RETRY seconds. (A restart, not a
        truncation to zero: freeing a 32 MiB file's blocks took 12 ms here, on top of the
        checkpoint's own fsyncs, while commits wait.)"""
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
        except sqlite3.Error:
            busy = 1
        if busy:
            self._trim_after = time.monotonic() + TRIM_RETRY
        return not busy

    def _trim_wal(self) -> None:
        """Between transactions, once the WAL is past its limit: restart it. On the
        writer thread ("fsync" mode) right here; on the loop ("process" mode) the
        checkpoint thread does it, and the writer holds its commits until it is done
        (here too if that thread is gone)."""
        if self._closing.is_set() or time.monotonic() < self._trim_after:
            return
        try:
            if self._wal.stat().st_size <= self._wal_limit:
                return
        except OSError:
            return
        if self._thread is not None or not self._checkpointer.is_alive():
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute(f"PRAGMA busy_timeout={int(TRIM_WAIT * 1000)}")
                try:
                    restarted = self._restart(self._wconn)
                finally:
                    self._wconn.execute("PRAGMA busy_timeout=5000")
                if restarted:
                    self._run([_CUT])
            return
        loop = asyncio.get_running_loop()
        self._holding = True
        self._handback = lambda: loop.call_soon_threadsafe(self._resume)
        self._trim_asked.set()

    def _resume(self) -> None:
        """On the loop, once the checkpoint thread has restarted the WAL: commit what
        waited, or `_CUT` if nothing did (an outbox refusing calls at its bound must see
        its WAL file shrink)."""
        self._holding = False
        if self._closing.is_set():
            return
        if not self._pending:
            self._pending.append(_CUT)
        self._flush()

    def _writer(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            batch = [op]
            while True:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._ops.put(None)
                    break
                batch.append(nxt)
            self._apply(batch)

    def _apply(self, batch: list[_Op]) -> None:
        """Run a batch in one transaction; on failure, each op alone, so only culprits fail."""
        err, committed = self._run(batch)
        if err is None or committed or len(batch) == 1:
            for op in batch:
                op.done(err)
        else:
            for op in batch:
                op.done(self._run([op])[0])
        if committed and self.committed is not None:
            self.committed()
        if self.vacuum_due:  # outside any transaction: executescript steps it to the end
            self.vacuum_due = False
            with contextlib.suppress(sqlite3.Error):
                self._wconn.executescript("PRAGMA incremental_vacuum")
        self._trim_wal()

    def _run(self, ops: list[_Op]) -> tuple[BaseException | None, bool]:
        """Apply `ops` in one transaction: (the error if any, whether it committed; an
        error after the commit leaves the ops committed: they are not run again)."""
        fault = self.faults or (lambda step: None)
        try:
            fault("begin")
            self._wconn.execute("BEGIN IMMEDIATE")
            for op in ops:
                fault("write")
                if op.many:
                    self._wconn.executemany(op.sql, op.args)
                else:
                    self._wconn.execute(op.sql, op.args)
            fault("commit")
            self._wconn.execute("COMMIT")
            self._pace.committed()
        except (sqlite3.Error, OSError) as e:
            if self._wconn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._wconn.execute("ROLLBACK")
            return e, False
        try:
            fault("committed")
        except (sqlite3.Error, OSError) as e:  # committed, but its success lost
            return e, True
        return None, True

    def submit(self, sql: str, args: Any, many: bool = False) -> asyncio.Future[None]:
        """Queue one write (`many`: `args` is a list of rows, written by one statement each,
        all in the same transaction); the future resolves once it is committed."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._thread is not None:
            self._ops.put(_Op(sql, args, many,
                              lambda err: loop.call_soon_threadsafe(_settle, fut, err)))
            return fut
        self._pending.append(_Op(sql, args, many, lambda err: _settle(fut, err)))
        if len(self._pending) == 1 and not self._holding:
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._apply(batch)

    def close(self) -> None:
        """Finish queued writes and stop the helper threads."""
        self._closing.set()  # no restart is asked for from now on
        self._trim_asked.set()
        self._checkpointer.join()  # after the restart in flight, if any
        self._holding = False
        if self._pending:
            self._flush()
        if self._thread is not None:
            self._ops.put(None)
            self._thread.join()
        self._wconn.close()


class Outbox:
    """Receipts (`outbox.sqlite3`) joined with their acknowledgements (`ledger.sqlite3`).

    `writable=False` opens it for reading only (the shipper's view). `max_bytes` bounds
    the bytes both files use (`admit`); `retention` is how long, in seconds, a logged
    receipt stays readable by its owner before `prune` deletes it.
    """

    def __init__(self, data_dir: Path, durability: str = "process",
                 writable: bool = True, max_bytes: int = MAX_BYTES,
                 retention: float = RETENTION) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.max_bytes = max_bytes
        self.retention = retention
        self.failing: str | None = None  # why the last write failed, until one succeeds
        self._usage = (float("-inf"), 0)
        path = data_dir / OUTBOX_FILE
        self._writer = _Writer(path, OUTBOX_SCHEMA, durability, wal_limit(max_bytes)) \
            if writable else None
        self.ringer = Ringer()  # the shipper's doorbell, once `gateway serve` attaches it
        if self._writer is not None:
            self._writer.committed = self._ring_after_answers
        _connect(data_dir / LEDGER_FILE, LEDGER_SCHEMA).close()
        if not writable:
            _connect(path, OUTBOX_SCHEMA).close()
        self._rconn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._rconn.execute("ATTACH DATABASE ? AS ledger", (str(data_dir / LEDGER_FILE),))
        self._rconn.execute("PRAGMA query_only=1")

    @property
    def faults(self) -> FaultHook | None:
        """The writer's fault hook (tests only)."""
        return self._writer.faults if self._writer is not None else None

    @faults.setter
    def faults(self, hook: FaultHook | None) -> None:
        self._writable().faults = hook

    def _writable(self) -> _Writer:
        """The writer; RuntimeError (a programming error) if opened read-only."""
        if self._writer is None:
            raise RuntimeError("outbox opened read-only")
        return self._writer

    async def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        """One write through the writer; OutboxUnavailable if it was not committed."""
        writer = self._writable()
        try:
            await writer.submit(sql, args)
        except (sqlite3.Error, OSError) as e:
            if isinstance(e, sqlite3.IntegrityError):
                raise  # this write's own fault (a duplicate id), not the storage's
            self.failing = f"{type(e).__name__}: {e}"
            raise OutboxUnavailable(self.failing) from e
        self.failing = None

    def _ring_after_answers(self) -> None:
        """Ring the shipper after a commit: on the event loop, once the calls the commit
        resumed (due first, in this loop turn) have sent their answers; at once elsewhere
        (the "fsync" writer thread, or `close`). A ring wakes an idle shipper, which on two
        CPUs then ran before the answer left: at about 10 calls a second the gateway's
        added p50 was 0.1-0.3 ms lower ringing after the answers (docs/benchmarks.md)."""
        try:
            asyncio.get_running_loop().call_soon(self.ringer.ring)
        except RuntimeError:
            self.ringer.ring()

    async def put(self, receipt_id: str, request_hash: str, entry: bytes,
                  key_sha256: str | None = None) -> None:
        """Commit one receipt durably, with the hash of the API key that owns it;
        OutboxUnavailable if it could not be."""
        await self._write(
            "INSERT INTO receipts(id, request_hash, entry, key_sha256, t) "
            "VALUES (?, ?, ?, ?, ?)", (receipt_id, request_hash, entry, key_sha256,
                                       int(time.time())))

    async def probe(self) -> None:
        """Commit one write through the same writer as `put` (a row of the `health` table,
        never a receipt): returns only if receipts can be committed now."""
        await self._write("INSERT OR REPLACE INTO health(k, v) VALUES ('probe', ?)",
                          (time.time(),))

    def bytes_used(self) -> int:
        """Bytes the outbox and ledger files take on disk, less their free pages (which
        SQLite reuses); measured at most USAGE_TTL seconds ago, and at each call once
        past the alarm level (so what is committed within USAGE_TTL cannot carry the files
        far past `max_bytes`)."""
        now = time.monotonic()
        if now - self._usage[0] < USAGE_TTL and self._usage[1] < ALARM * self.max_bytes:
            return self._usage[1]
        total = 0
        try:
            for name in FILES:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(self.data_dir / name).st_size
            page = self._rconn.execute("PRAGMA page_size").fetchone()[0]
            for db in ("main", "ledger"):
                total -= page * self._rconn.execute(f"PRAGMA {db}.freelist_count").fetchone()[0]
        except (OSError, sqlite3.Error):
            return self._usage[1]  # unmeasurable now: the last measurement stands
        self._usage = (now, max(total, 0))
        return self._usage[1]

    def near_bound(self) -> bool:
        """Whether the bytes in use passed the alarm level (ALARM of `max_bytes`)."""
        return self.bytes_used() >= ALARM * self.max_bytes

    async def admit(self) -> str | None:
        """None if a receipt can be kept now, else the refusal code: `outbox_full` at
        `max_bytes`, `outbox_unavailable` while writes fail (a probe write is tried)."""
        if self.bytes_used() >= self.max_bytes:
            return "outbox_full"
        if self.failing is not None:
            with contextlib.suppress(OutboxUnavailable):
                await self.probe()
            if self.failing is not None:
                return "outbox_unavailable"
        return None

    def pruned_through(self) -> int:
        """Every receipt numbered up to this one has been pruned (0: none)."""
        row = self._rconn.execute("SELECT v FROM health WHERE k = 'pruned'").fetchone()
        return int(row[0]) if row else 0

    def prunable_through(self, now: float) -> int:
        """The last receipt number `prune` may delete through now: every receipt up to it
        is logged and older than the retention (any age past the alarm level), and it is
        not the newest receipt."""
        done = self.pruned_through()
        newest = self._rconn.execute("SELECT max(seq) FROM receipts").fetchone()[0] or 0
        cutoff = now if self.near_bound() else now - self.retention
        stop = min(newest, done + PRUNE_BATCH + 1)
        young = self._rconn.execute(
            "SELECT seq FROM receipts WHERE seq > ? AND coalesce(t, 0) > ? "
            "ORDER BY seq LIMIT 1", (done, cutoff)).fetchone()
        if young is not None:
            stop = min(stop, young[0])
        unlogged = self._rconn.execute(
            "SELECT r.seq FROM receipts r WHERE r.seq > ? AND r.seq < ? AND NOT EXISTS "
            "(SELECT 1 FROM ledger.logged l WHERE l.seq = r.seq) ORDER BY r.seq LIMIT 1",
            (done, stop)).fetchone()
        if unlogged is not None:
            stop = unlogged[0]
        return max(done, stop - 1)

    async def prune(self, now: float | None = None) -> int:
        """Delete the next batch of logged receipts past their retention (oldest first);
        how many receipt numbers it covered."""
        done = self.pruned_through()
        through = self.prunable_through(time.time() if now is None else now)
        if through <= done:
            return 0
        writer = self._writable()
        writer.vacuum_due = True
        await asyncio.gather(
            writer.submit("DELETE FROM receipts WHERE seq > ? AND seq <= ?", (done, through)),
            writer.submit("INSERT OR REPLACE INTO health(k, v) VALUES ('pruned', ?)",
                          (through,)))
        return through - done

    def unlogged_after(self, seq: int, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        """(seq, id, entry) of receipts after `seq` the log has not acknowledged, oldest first."""
        cur = self._rconn.execute(
            "SELECT r.seq, r.id, r.entry FROM receipts r WHERE r.seq > ? AND NOT EXISTS "
            "(SELECT 1 FROM ledger.logged l WHERE l.seq = r.seq) ORDER BY r.seq LIMIT ?",
            (seq, limit))
        return [(s, i, bytes(e)) for s, i, e in cur.fetchall()]

    @staticmethod
    def _row(r: tuple[Any, ...] | None) -> Row | None:
        if r is None:
            return None
        entry = bytes(r[2])
        text = None
        if r[4] is not None:
            p = proof.parse(bytes(r[4]))
            text = proof.TlogProof(p.index, p.hashes, p.checkpoint, entry).format().decode()
        return Row(r[0], r[1], entry, r[3], text, r[5])

    def get(self, receipt_id: str) -> Row | None:
        """The receipt with that id (with the full tlog-proof text once logged)."""
        return self._row(self._rconn.execute(ROW + "WHERE r.id = ?", (receipt_id,)).fetchone())

    def by_request_hash(self, request_hash: str) -> Row | None:
        """The newest receipt for a request hash."""
        return self._row(self._rconn.execute(
            ROW + "WHERE r.request_hash = ? ORDER BY r.seq DESC LIMIT 1",
            (request_hash,)).fetchone())

    def logged_among(self, ids: list[str]) -> set[str]:
        """Which of these receipt ids the log has acknowledged."""
        marks = ",".join("?" * len(ids))
        cur = self._rconn.execute("SELECT r.id FROM receipts r JOIN ledger.logged l "  # noqa: S608 - only "?" placeholders are formatted in; ids are bound parameters
                                  f"ON l.seq = r.seq WHERE r.id IN ({marks})", ids)
        return {r[0] for r in cur.fetchall()}

    def state(self) -> dict[str, str]:
        """The shipper's published state (`log_down`, `last_error`)."""
        return dict(self._rconn.execute("SELECT k, v FROM ledger.state").fetchall())

    def counts(self) -> tuple[int, int]:
        """(receipts kept, receipts not yet logged)."""
        total = self._rconn.execute("SELECT count(*) FROM receipts").fetchone()[0]
        logged = self._rconn.execute("SELECT count(*) FROM ledger.logged WHERE seq > ?",
                                     (self.pruned_through(),)).fetchone()[0]
        return total, total - logged

    def close(self) -> None:
        """Finish queued writes and close."""
        if self._writer is not None:
            self._writer.close()
        self.ringer.close()
        self._rconn.close()


class Ledger:
    """The shipper's writable `ledger.sqlite3`: acknowledgements and state. A write it
    could not commit raises OutboxUnavailable."""

    def __init__(self, data_dir: Path, max_bytes: int = MAX_BYTES,
                 ringer: Ringer | None = None) -> None:
        self._writer = _Writer(data_dir / LEDGER_FILE, LEDGER_SCHEMA, "process",
                               wal_limit(max_bytes))
        self.ringer = ringer or Ringer()  # the gateway's ledger doorbell, rung after commits
        self._writer.committed = self.ringer.ring

    async def record(self, acks: list[tuple[int, proof.TlogProof]]) -> None:
        """Record the log's acknowledgements (index and proof) of these receipt numbers, in
        one transaction: all of them or none."""
        rows = [(seq, p.index, proof.TlogProof(p.index, p.hashes, p.checkpoint).format())
                for seq, p in acks]
        await self._write("INSERT OR REPLACE INTO logged(seq, log_index, proof) VALUES (?, ?, ?)",
                          rows, many=True)

    async def _write(self, sql: str, args: Any, many: bool = False) -> None:
        try:
            await self._writer.submit(sql, args, many)
        except (sqlite3.Error, OSError) as e:
            raise OutboxUnavailable(f"{type(e).__name__}: {e}") from e

    async def prune(self, through: int) -> None:
        """Delete the acknowledgements of receipts numbered up to `through` (the outbox
        pruned them)."""
        self._writer.vacuum_due = True
        await self._write("DELETE FROM logged WHERE seq <= ?", (through,))

    async def set_state(self, log_down: bool, last_error: str | None) -> None:
        """Publish whether the log is reachable, and the last shipping error."""
        await self._write(
            "INSERT OR REPLACE INTO state(k, v) VALUES ('log_down', ?), ('last_error', ?)",
            ("1" if log_down else "0", last_error or ""))

    def close(self) -> None:
        """Finish queued writes and close."""
        self._writer.close()
        self.ringer.close()
