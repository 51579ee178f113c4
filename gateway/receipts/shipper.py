"""Ships outbox receipts to the transparency log (`POST /add`) and records their proofs.

The shipper runs as its own process (`python -m gateway.receipts.shipper`, started by
`gateway serve`) or as tasks in the caller's loop; either way it reads new
receipts from the outbox (by sequence number; once idle, it waits for the
gateway's doorbell, doorbell.py, instead of polling), writes acknowledgements
to the ledger, and the gateway learns about them through `LogStatus` (rung by
the ledger's doorbell after each commit, when `gateway serve` started it).

Invariants:
- A receipt is marked logged only after the log answered 200 with an index and
  a tlog-proof whose entry is exactly the receipt and (with the log's vkey, which
  `gateway serve` requires) whose checkpoint is signed by the log, cosigned by
  at least the configured quorum of distinct witnesses, and includes the entry.
- A proof below the quorum is not recorded. Its entry is in the log, so it is
  not appended again: the shipper asks `GET /proof/{request_hash}` for a fresher
  proof (with backoff) until one meets the quorum.
- Failures are retried forever with capped exponential backoff; nothing is
  dropped. `log_down` is true from a failed attempt until the next success.
  An acknowledgement the ledger cannot store (disk full) is retried alone, with
  the same backoff, until it is stored; the receipt is not appended again.
- The gateway prunes logged receipts past their retention (`LogStatus`, through
  `Outbox.prune`); the shipper then deletes their acknowledgements from its
  ledger, so neither file grows without bound.
- Many posts are in flight at once (the log batches them into one checkpoint),
  each on its own pooled keep-alive HTTP/1.1 connection; receipts that queue
  up go in one `POST /add-batch` (up to BATCH) asking for the compact answer
  (tlog/batch.py: one checkpoint, verified once, and one proof of the whole
  batch, recomputed from the entries sent to the checkpoint's root; each
  entry's path, and the tlog-proof text `POST /add` would answer, rebuilt
  locally on the way) and
  reading the old one (each item as `POST /add` answers) from a log that
  ignores the ask; whatever a batch did not get acknowledged is shipped singly.
- At most BATCHES_IN_FLIGHT batch posts are in flight at once: receipts that
  arrive meanwhile wait for the next one, so under load the batches grow with
  the log's answer time (the log, its witnesses and this checker work per
  batch, not per receipt: at 16 clients on the demo, one batch in flight
  instead of one per poll cut their CPU per receipt by about a fifth), while an idle
  shipper still posts a lone receipt at once. The singles a batch leaves over
  (retried forever) do not hold the batch slot, so they cannot stall batching.
- Batch posts start at least `batch_interval` apart (BATCH_INTERVAL, 50 ms; the
  gateway passes 0 when `require_log_inclusion` makes its answers wait for the
  log): under load a receipt waits up to that long to be sent, and the log,
  its witnesses and this checker do their per-batch work a fifth as often (at
  16 clients on the demo, about 100 receipts a batch instead of 19, and half
  the CPU per receipt in this shipper, the log and its witness). A receipt
  arriving after a pause longer than the interval is posted at once; a full
  batch (BATCH) never waits. A receipt held back is still in the outbox: a
  shipper stopped meanwhile sends it after its restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import sqlite3
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.receipts.doorbell import ACK_POLL, IDLE_LOOKS, IDLE_POLL, Bell, Ringer
from gateway.receipts.outbox import MAX_BYTES, Ledger, Outbox, OutboxUnavailable
from tlog import batch, checkpoint, merkle, note, proof, tiles
from tlog.http1 import Connection, Pool, ProtocolError, exchange
from tlog.service import log_json
from witness import cosignature

log = logging.getLogger("gateway.receipts.shipper")

BACKOFF_START = 0.05
BACKOFF_MAX = 2.0
POST_TIMEOUT = 30.0
POLL = 0.002
STATE_POLL = 0.05  # seconds at least between two reads of the shipper's state (and the
# period of those reads without a ledger doorbell)
BATCH = 256  # receipts per POST /add-batch at most (a tile's width, as the log's bench posts)
BATCHES_IN_FLIGHT = 1  # POST /add-batch requests outstanding at once
BATCH_INTERVAL = 0.05  # seconds at least between the starts of two batch posts
MAX_BATCH_INTERVAL = 10.0
LOCK_FILE = "shipper.lock"
LOCK_WAIT = 15.0
HEX64 = re.compile(r"[0-9a-f]{64}")
PRUNE_EVERY = 5.0  # seconds between pruning rounds


def check_batch_interval(seconds: float) -> float:
    """`seconds`, if it is a usable batch interval: ValueError unless 0 to
    MAX_BATCH_INTERVAL (so never NaN or infinite)."""
    if not 0 <= seconds <= MAX_BATCH_INTERVAL:
        raise ValueError(f"batch interval must be 0 to {MAX_BATCH_INTERVAL:g} seconds")
    return seconds


class ShipError(Exception):
    """The log did not acknowledge an entry (the message is safe to log).

    `appended`: the log did sign a checkpoint including the entry, but with fewer valid
    witness cosignatures than the quorum; asking for a fresher proof beats appending it
    again."""

    def __init__(self, message: str, *, log_down: bool, status: int | None = None,
                 appended: bool = False) -> None:
        super().__init__(message)
        self.log_down = log_down
        self.status = status
        self.appended = appended


class ProofChecker:
    """Checks the log's answer for one entry: the proof's entry is the one sent, its
    checkpoint is signed by the log (`vkey`) and cosigned by at least `quorum` distinct
    configured witnesses (`witness.cosignature.verify_witnessed`), and the entry is included
    under it. Checkpoints already verified are cached. Without a vkey only the entry and
    index are compared (no witness policy is possible then)."""

    def __init__(self, vkey: str | None, witnesses: Sequence[str] = (), quorum: int = 0) -> None:
        self._verifier = note.verifier_from_vkey(vkey) if vkey else None
        self._witnesses = cosignature.parse_vkeys(witnesses)
        if quorum and self._verifier is None:
            raise ValueError("a witness quorum needs the log's vkey")
        if quorum > len(self._witnesses):
            raise ValueError(f"quorum {quorum} exceeds the {len(self._witnesses)} witness keys")
        self._quorum = quorum
        self._seen: dict[bytes, checkpoint.Checkpoint] = {}

    def check(self, entry: bytes, answer: bytes) -> proof.TlogProof:
        """The proof from a `POST /add` answer, or ShipError."""
        try:
            doc = orjson.loads(answer)
        except orjson.JSONDecodeError as e:
            raise ShipError(f"log answer malformed: {e}", log_down=False) from e
        return self.check_doc(entry, doc)

    def check_doc(self, entry: bytes, doc: object) -> proof.TlogProof:
        """The proof from one parsed answer (of `POST /add`, or an item of `/add-batch`)."""
        try:
            if not isinstance(doc, dict):
                raise TypeError("answer is not an object")
            index = doc["index"]
            text = doc["proof"]
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(text, str):
                raise TypeError("index or proof of the wrong type")
            p = proof.parse(text.encode())
        except (KeyError, TypeError, proof.ProofFormatError) as e:
            raise ShipError(f"log answer malformed: {e}", log_down=False) from e
        if p.index != index:
            raise ShipError("log proof does not match the entry sent", log_down=False)
        return self.check_proof(entry, p)

    def check_proof(self, entry: bytes, p: proof.TlogProof) -> proof.TlogProof:
        """`p` if it proves `entry` under a checkpoint meeting the policy, else ShipError."""
        if p.extra is not None and p.extra != entry:
            raise ShipError("log proof does not match the entry sent", log_down=False)
        if self._verifier is None:
            return p
        try:
            cp, unwitnessed = self._open(p.checkpoint)
        except (checkpoint.CheckpointError, note.NoteError) as e:
            raise ShipError(f"log proof does not verify: {e}", log_down=False) from e
        return self._included(entry, p, cp, unwitnessed)

    def check_batch(self, entries: Sequence[bytes], doc: object
                    ) -> list[proof.TlogProof | ShipError]:
        """Each entry's proof (or why not) from a parsed `POST /add-batch` answer: compact
        (tlog/batch.py: its one checkpoint verified once, its one proof recomputed from
        the entries sent to the checkpoint's root, each entry's own path rebuilt on the
        way) or the default form (each item as `POST /add` answers). ShipError if the
        answer as a whole is malformed or, compact, does not verify."""
        if not (isinstance(doc, dict) and "checkpoint" in doc):
            items = doc.get("entries") if isinstance(doc, dict) else None
            if not isinstance(items, list) or len(items) != len(entries):
                raise ShipError("log batch answer malformed", log_down=False)
            return [_attempt(self.check_doc, e, item)
                    for e, item in zip(entries, items, strict=True)]
        try:
            answer = batch.parse(doc)
            cp, unwitnessed = self._open_batch(answer.checkpoint)
            root, rebuilt = batch.rebuild(answer, entries, cp.size)
        except batch.BatchFormatError as e:
            raise ShipError(f"log batch answer malformed: {e}", log_down=False) from e
        except (checkpoint.CheckpointError, note.NoteError, merkle.ProofError) as e:
            raise ShipError(f"log batch proof does not verify: {e}", log_down=False) from e
        if root is not None and root != cp.root_hash:
            raise ShipError("log batch proof does not lead to the checkpoint's root",
                            log_down=False)
        out: list[proof.TlogProof | ShipError] = []
        for p in rebuilt:
            if isinstance(p, batch.Refused):
                out.append(ShipError(f"log did not acknowledge the entry: {p.code}",
                                     log_down=False))
            elif unwitnessed is not None:
                out.append(ShipError(f"log proof is not witnessed: {unwitnessed}",
                                     log_down=True, appended=True))
            else:
                out.append(p)
        return out

    def _open_batch(self, signed: bytes) -> tuple[checkpoint.Checkpoint, str | None]:
        """`_open`, or without the log's vkey only the checkpoint parsed (no policy then)."""
        if self._verifier is None:
            return checkpoint.parse(note.split(signed)[0]), None
        return self._open(signed)

    def _included(self, entry: bytes, p: proof.TlogProof, cp: checkpoint.Checkpoint,
                  unwitnessed: str | None) -> proof.TlogProof:
        """`p` if it includes `entry` under `cp` (the log's, opened by `_open`) and `cp`
        meets the quorum; else ShipError (appended if only the quorum is missing)."""
        try:
            proof.check_inclusion(p, cp, entry)
        except merkle.ProofError as e:
            raise ShipError(f"log proof does not verify: {e}", log_down=False) from e
        if unwitnessed is not None:
            raise ShipError(f"log proof is not witnessed: {unwitnessed}", log_down=True,
                            appended=True)
        return p

    def _open(self, signed: bytes) -> tuple[checkpoint.Checkpoint, str | None]:
        """The checkpoint of a note signed by the log, and why it misses the witness
        quorum (None if it meets it: then it is cached). Raises CheckpointError or
        NoteError if the log did not sign it."""
        assert self._verifier is not None  # noqa: S101 - type narrowing: callers check
        cp = self._seen.get(signed)
        if cp is not None:
            return cp, None
        try:
            cp = cosignature.verify_witnessed(signed, self._verifier, self._witnesses,
                                              self._quorum).checkpoint
        except cosignature.QuorumError as e:
            return checkpoint.open(signed, self._verifier)[0], str(e)
        if len(self._seen) > 64:
            self._seen.clear()
        self._seen[signed] = cp
        return cp, None


def _attempt(check: Callable[..., proof.TlogProof], *args: Any) -> proof.TlogProof | ShipError:
    """`check(*args)`, or the ShipError it raised."""
    try:
        return check(*args)
    except ShipError as e:
        return e


class Shipper:
    """Appends outbox receipts to the log, many posts in flight, retrying forever."""

    def __init__(self, data_dir: Path, url: str, token: str | None, vkey: str | None = None,
                 concurrency: int = 128, witnesses: Sequence[str] = (),
                 quorum: int = 0, max_bytes: int = MAX_BYTES,
                 batch_interval: float = BATCH_INTERVAL, bell_fd: int | None = None,
                 ack_fd: int | None = None) -> None:
        self.data_dir = data_dir
        self.url = url.rstrip("/")
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("log url must be http(s)://host[:port][/prefix]")
        self._target = (u.hostname, u.port or (443 if u.scheme == "https" else 80),
                        u.scheme == "https", None)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._head, self._batch_head = ((
            f"POST {u.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {u.netloc}\r\n{auth}"
            f"Content-Type: application/octet-stream\r\n{accept}").encode()
            for path, accept in (("/add", ""), ("/add-batch", f"Accept: {batch.MEDIA_TYPE}\r\n")))
        self._proof_head = f"GET {u.path.rstrip('/')}/proof/%s HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n"

        self._max_bytes = max_bytes
        self._batching = True  # until the log answers 404/405 to /add-batch
        self._checker = ProofChecker(vkey, witnesses, quorum)
        self._concurrency = concurrency
        self._queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
        self._batch_slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        self._batch_interval = check_batch_interval(batch_interval)
        self._last_batch = float("-inf")  # loop time the last batch post started
        self._due = float("-inf")  # loop time a batch waiting out the interval leaves
        self._tasks: list[asyncio.Task[None]] = []
        self._pool = Pool()
        self._bell = Bell(bell_fd)  # the read end of the gateway's doorbell (doorbell.py)
        self._acks = Ringer()  # the gateway's ledger doorbell (doorbell.py)
        if ack_fd is not None:
            self._acks.attach(ack_fd)
        self._lock: int | None = None
        self.outbox: Outbox | None = None
        self.ledger: Ledger | None = None
        self.log_down = False
        self.shipped = 0
        self.batched = 0  # of those shipped, acknowledged through /add-batch

    async def start(self) -> None:
        """Take the single-shipper lock, open the stores, start polling and posting."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        for _ in range(int(LOCK_WAIT / POLL)):  # a previous shipper may still be exiting
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                await asyncio.sleep(POLL)
        else:
            os.close(fd)
            raise RuntimeError(f"another shipper holds {self.data_dir / LOCK_FILE}")
        self._lock = fd
        self.outbox = Outbox(self.data_dir, writable=False)
        self.ledger = Ledger(self.data_dir, self._max_bytes, self._acks)
        await self.ledger.set_state(False, None)
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._prune())]
        self._tasks += [asyncio.create_task(self._worker()) for _ in range(self._concurrency)]

    async def _poll(self) -> None:
        """Queue receipts not yet logged, oldest first, keeping the queue short. A look
        that found nothing is followed by the next one POLL later; after IDLE_LOOKS of
        them in a row, the next waits for the gateway's doorbell (doorbell.py), at most
        IDLE_POLL. (Under load the empty looks come one at a time, and waiting on the
        bell after each cost more than the look it saved.) With a batch interval of 0
        (answers wait for the log: latency first) it waits for the bell after each empty
        look and looks again as soon as it rings, not POLL after the last look (one
        client: a median 4.45 ms added per call instead of 6.24, docs/benchmarks-history.md).
        While a batch waits out the interval nothing can leave before it does, so the
        next look comes POLL before it leaves (at 16 clients, one look a batch instead of
        one every POLL: 25 a batch at the default interval)."""
        assert self.outbox is not None  # noqa: S101 - type narrowing: opened by start()
        loop = asyncio.get_running_loop()
        eager = self._batch_interval == 0
        idle_looks = 1 if eager else IDLE_LOOKS
        cursor = empty = 0
        while True:
            if self._queue.qsize() > 4 * self._concurrency:
                await asyncio.sleep(POLL)
                continue
            ahead = self._due - POLL - loop.time()
            if ahead > 0:  # a batch waits out its interval: look once, just before it leaves
                await asyncio.sleep(ahead)
                continue
            looked = loop.time()
            rows = self.outbox.unlogged_after(cursor, 4 * self._concurrency)
            for row in rows:
                self._queue.put_nowait(row)
                cursor = row[0]
            if rows:
                empty = 0
                await asyncio.sleep(0)
                continue
            empty += 1
            if empty >= idle_looks and self._bell.listening:
                await self._bell.wait(IDLE_POLL)
                if eager:
                    continue
            await asyncio.sleep(max(0.0, looked + POLL - loop.time()))

    async def _prune(self) -> None:
        """Delete the acknowledgements of receipts the outbox pruned."""
        assert self.outbox is not None and self.ledger is not None  # noqa: S101 - type narrowing: opened by start()
        done = 0
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            try:
                through = self.outbox.pruned_through()
                if through > done:
                    await self.ledger.prune(through)
                    done = through
            except (OutboxUnavailable, sqlite3.Error, OSError) as e:
                log.warning("ledger pruning failed: %s", e)

    async def _record(self, acks: list[tuple[int, proof.TlogProof]]) -> None:
        """Store acknowledgements (one transaction), retrying (with backoff) until the ledger
        takes them."""
        assert self.ledger is not None  # noqa: S101 - type narrowing: opened by start()
        delay = BACKOFF_START
        while True:
            try:
                await self.ledger.record(acks)
                return
            except OutboxUnavailable as e:
                log.error("ledger unavailable, retrying: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _set_state(self, log_down: bool, last_error: str | None) -> None:
        """Publish the log's reachability (advisory: a failure to store it is logged)."""
        assert self.ledger is not None  # noqa: S101 - type narrowing: opened by start()
        try:
            await self.ledger.set_state(log_down, last_error)
        except OutboxUnavailable as e:
            log.warning("ledger unavailable for the shipper state: %s", e)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request on a pooled connection; ShipError if unreachable."""
        conn: Connection | None = None
        try:
            async with asyncio.timeout(POST_TIMEOUT):
                conn, status, _ = await exchange(self._pool, self._target, request)
                body = await conn.body()
            self._pool.release(conn)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as e:
            if conn is not None:
                conn.close()
            raise ShipError(f"log unreachable: {type(e).__name__}", log_down=True) from e
        return status, body

    async def _post(self, entry: bytes, head: bytes | None = None) -> bytes:
        status, body = await self._exchange(
            (head or self._head) + b"Content-Length: %d\r\n\r\n" % len(entry) + entry)
        if status != 200:
            raise ShipError(f"log answered HTTP {status}",
                            log_down=status >= 500 or status in (401, 403), status=status)
        return body

    async def _fresh_proof(self, entry: bytes) -> proof.TlogProof:
        """A proof of an entry the log already holds, from `GET /proof/{request_hash}`.
        ShipError(appended=False) if the log does not have it (then it is appended again)."""
        try:
            h = orjson.loads(entry).get("request_hash")
        except (orjson.JSONDecodeError, AttributeError):
            h = None
        if not isinstance(h, str) or not HEX64.fullmatch(h):
            raise ShipError("entry has no request hash to look up", log_down=False)
        status, body = await self._exchange((self._proof_head % h).encode())
        if status != 200:
            raise ShipError(f"log answered HTTP {status} to GET /proof", log_down=status >= 500,
                            status=status, appended=status >= 500)
        try:
            p = proof.parse(body)
        except proof.ProofFormatError as e:
            raise ShipError(f"log proof malformed: {e}", log_down=False) from e
        if p.extra != entry:
            raise ShipError("the log's proof for that request hash is of another entry",
                            log_down=False)
        return self._checker.check_proof(entry, p)

    async def _ship(self, seq: int, receipt_id: str, entry: bytes, appended: bool = False
                    ) -> None:
        assert self.ledger is not None  # noqa: S101 - type narrowing: opened by start()
        delay = BACKOFF_START
        while True:
            try:
                if appended:
                    p = await self._fresh_proof(entry)
                else:
                    p = self._checker.check(entry, await self._post(entry))
                await self._record([(seq, p)])
                break
            except ShipError as e:
                appended = e.appended or (appended and e.log_down)
                if e.log_down and not self.log_down:
                    log.warning("receipt log unavailable: %s", e)
                    self.log_down = True
                    await self._set_state(True, str(e))
                elif not e.log_down:
                    log.error("receipt %s not accepted by the log: %s", receipt_id, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.shipped += 1
        await self._reachable()

    async def _reachable(self) -> None:
        assert self.ledger is not None  # noqa: S101 - type narrowing: opened by start()
        if self.log_down:
            log.info("receipt log reachable again")
            self.log_down = False
            await self._set_state(False, None)

    async def _ship_batch(self, queued: list[tuple[int, str, bytes]]
                          ) -> list[tuple[int, str, bytes, bool]]:
        """One `POST /add-batch`; returns what it did not get acknowledged (shipped singly),
        each with whether the log holds it already."""
        assert self.ledger is not None  # noqa: S101 - type narrowing: opened by start()
        entries = [e for _, _, e in queued]
        try:
            answer = await self._post(tiles.encode_bundle(entries), self._batch_head)
            results = self._checker.check_batch(entries, orjson.loads(answer))
        except ShipError as e:
            if e.status in (404, 405):
                log.info("the log has no /add-batch; appending one entry per request")
                self._batching = False
            return [(*b, False) for b in queued]
        except orjson.JSONDecodeError:
            return [(*b, False) for b in queued]
        rest, acks = [], []
        for (seq, rid, entry), r in zip(queued, results, strict=True):
            if isinstance(r, ShipError):
                rest.append((seq, rid, entry, r.appended))
            else:
                acks.append((seq, r))
        if acks:
            await self._record(acks)
            self.shipped += len(acks)
            self.batched += len(acks)
        if len(rest) < len(queued):
            await self._reachable()
        return rest

    async def _worker(self) -> None:
        """Take what is queued (up to BATCH) once a batch slot is free, post it, then ship
        what it left over one by one (outside the slot)."""
        loop = asyncio.get_running_loop()
        while True:
            async with self._batch_slots:
                queued = [await self._queue.get()]
                wait = self._last_batch + self._batch_interval - loop.time()
                if wait > 0 and self._queue.qsize() < BATCH - 1:  # a full batch goes now
                    self._due = loop.time() + wait
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        self._due = float("-inf")
                self._last_batch = loop.time()
                while len(queued) < BATCH and not self._queue.empty():
                    queued.append(self._queue.get_nowait())
                rest = [(*b, False) for b in queued]
                if len(queued) > 1 and self._batching:
                    rest = await self._ship_batch(queued)
            for seq, rid, entry, appended in rest:
                await self._ship(seq, rid, entry, appended)

    async def close(self) -> None:
        """Stop (receipts not yet logged stay in the outbox for the next start)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._pool.close()
        self._bell.close()
        self._acks.close()
        if self.ledger is not None:
            self.ledger.close()
        if self.outbox is not None:
            self.outbox.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class LogStatus:
    """The gateway's view of shipping: is the log down, and waiting for a receipt's proof.

    One task follows the ledger: it resolves waiting calls (`wait_logged`) and reads the
    shipper's state (`log_down`, `last_error`) after each ring of the shipper's ledger
    doorbell (`listen`), and at least every ACK_POLL while calls wait, every IDLE_POLL
    otherwise. Every ledger commit rings, state changes included, so a change is seen
    within STATE_POLL of being stored: the state is read at most that often (under load
    the rings come faster), and a ring that came sooner gets its read when it is due.
    Without a bell it looks every POLL while calls wait and every STATE_POLL otherwise."""

    def __init__(self, outbox: Outbox, enabled: bool) -> None:
        self.outbox = outbox
        self.enabled = enabled
        self.log_down = False
        self.last_error: str | None = None
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._until: float | None = None  # (loop time) once draining: no call waits past it
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._acks = Bell(None)

    def listen(self, fd: int) -> None:
        """Read the ledger when `fd` (a pipe's read end, taken over: the ledger doorbell
        of the shipper just started) rings; the previous shipper's pipe is closed."""
        self._acks.close()
        self._acks = Bell(fd)

    async def start(self) -> None:
        """Start following the ledger."""
        if self.enabled:
            self._tasks = [asyncio.create_task(self._follow()),
                           asyncio.create_task(self._prune())]

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        state_due = loop.time()
        while True:
            now = loop.time()
            stale = now < state_due  # looked again sooner: read the state when it is due
            if not stale:
                st = self.outbox.state()
                self.log_down = st.get("log_down") == "1"
                self.last_error = st.get("last_error") or None
                state_due = now + STATE_POLL
            if self._waiters:
                for rid in self.outbox.logged_among(list(self._waiters)[:500]):
                    for fut in self._waiters.pop(rid, ()):
                        if not fut.done():
                            fut.set_result(True)
            timeout = ACK_POLL if self._waiters else IDLE_POLL
            if stale:
                timeout = min(timeout, state_due - now)
            if self._acks.listening:
                await self._acks.wait(timeout)
            elif self._waiters:
                await asyncio.sleep(POLL)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(timeout, STATE_POLL)):
                        await self._wake.wait()

    async def _prune(self) -> None:
        """Prune logged receipts past their retention (Outbox.prune), batch by batch."""
        while True:
            try:
                while await self.outbox.prune():
                    await asyncio.sleep(0)
            except (OutboxUnavailable, sqlite3.Error, OSError) as e:
                log.warning("outbox pruning failed: %s", e)
            await asyncio.sleep(PRUNE_EVERY)

    async def wait_logged(self, receipt_id: str, timeout: float) -> bool:
        """Wait until the log acknowledged the receipt; False on timeout, or once draining
        (`drain`) has run out (either way it stays queued)."""
        loop = asyncio.get_running_loop()
        if self._until is not None:
            timeout = min(timeout, self._until - loop.time())
        fut: asyncio.Future[bool] = loop.create_future()
        if not self._waiters:  # the follower may be in an idle wait: look now
            self._wake.set()
            self._acks.poke()
        self._waiters.setdefault(receipt_id, []).append(fut)
        try:
            return await asyncio.wait_for(fut, max(timeout, 0.0))
        except TimeoutError:
            waiting = self._waiters.get(receipt_id, [])
            if fut in waiting:
                waiting.remove(fut)
            if not waiting:
                self._waiters.pop(receipt_id, None)
            return False

    def drain(self, grace: float) -> None:
        """The server is stopping: calls waiting for the log, and calls that start waiting,
        wait at most `grace` seconds more, then answer as on a timeout (their receipts stay
        queued for the next start), before the server cancels what still runs."""
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        if self._until is not None and self._until <= until:
            return
        self._until = until
        loop.call_at(until, self._release)

    @property
    def stopping(self) -> bool:
        """Whether the server began to stop (`drain` was called)."""
        return self._until is not None

    def _release(self) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(False)
        self._waiters.clear()

    async def close(self) -> None:
        """Stop following."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._acks.close()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (so kill -9 of the
    gateway does not leave a second shipper behind)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def main(argv: list[str]) -> int:
    """`python -m gateway.receipts.shipper --data DIR --log URL [--token-file F] [--vkey V]
    [--witness-vkey W ...] [--quorum K] [--batch-interval SECONDS]`."""
    ap = argparse.ArgumentParser(prog="python -m gateway.receipts.shipper")
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--log", required=True)
    ap.add_argument("--token-file", type=Path)
    ap.add_argument("--vkey")
    ap.add_argument("--witness-vkey", action="append", default=[],
                    help="a witness whose cosignatures count (repeated)")
    ap.add_argument("--quorum", type=int, default=0,
                    help="distinct valid witness cosignatures a proof needs")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--parent", type=int, help="exit when this process is gone")
    ap.add_argument("--outbox-max-bytes", type=int, default=MAX_BYTES,
                    help="the gateway's [gateway] outbox_max_bytes (sizes the ledger's WAL)")
    ap.add_argument("--bell-fd", type=int,
                    help="an inherited pipe the gateway rings after each outbox commit")
    ap.add_argument("--ack-fd", type=int,
                    help="an inherited pipe to ring after each ledger commit")
    ap.add_argument("--batch-interval", type=float, default=BATCH_INTERVAL,
                    help=f"seconds at least between two batch posts "
                         f"(0 to {MAX_BATCH_INTERVAL:g}; 0: none)")
    a = ap.parse_args(argv)
    try:
        check_batch_interval(a.batch_interval)
    except ValueError as e:
        ap.error(f"--batch-interval: {e}")
    for flag, fd in (("--bell-fd", a.bell_fd), ("--ack-fd", a.ack_fd)):
        if fd is not None and not _is_pipe(fd):
            ap.error(f"{flag}: not an open pipe")
    log_json()
    _die_with_parent()
    token = a.token_file.read_text().strip() if a.token_file else None

    async def run() -> None:
        shipper = Shipper(a.data, a.log, token, a.vkey, a.concurrency, a.witness_vkey, a.quorum,
                          a.outbox_max_bytes, a.batch_interval, a.bell_fd, a.ack_fd)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await shipper.start()
        try:
            while not stop.is_set():
                if a.parent and os.getppid() != a.parent:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            await shipper.close()

    try:
        import uvloop
        uvloop.run(run())
    except RuntimeError as e:
        print(f"shipper: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
