"""Who sequences: one writer per log at a time, among replicas sharing PostgreSQL.

Every `tlog serve --database postgresql://…` process is a replica: it serves
checkpoints, tiles, entry bundles, proofs and consistency proofs from the
shared database. One of them at a time is also the sequencer, the only one
that appends. It is chosen by one lease row (`tlog_sequencer`):

- the row holds a fencing token, the holder's id and advertised URL, the
  backend pid of the holder's lease connection, and an expiry in database
  time (no replica's clock matters);
- a round of `campaign` takes the lease if it is ours, expired, or its
  holder's lease connection is gone from `pg_stat_activity` (the holder
  died: a killed process's connections close at once, so takeover does not
  wait for the expiry). Taking it from someone else increments the token;
- every write transaction of the sequencer checks the token under a share
  lock on the row (postgres_store.py). Taking the lease updates the row, so
  it waits for a write in flight and then makes every later write by the
  old holder fail: a paused old sequencer that wakes up can never commit,
  whatever it believes. PostgreSQL ends a write transaction left idle
  (postgres_store.STALLED_TRANSACTION), so a writer paused mid-transaction
  cannot block a takeover for longer.

Safety (one history) rests only on the token check; the expiry and the pid
check only decide how soon a replica takes over. The sequencer steps down
when its lease is taken, when a write is fenced, or when it could not renew
for `ttl` seconds measured from before its last successful round (so it
never believes in a lease the database already let go). Each new sequencer
starts with `storage.recover`: entries the old one persisted without a
checkpoint are covered, and nothing is ever rewritten.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg

from tlog.postgres_store import CONNECT_TIMEOUT, one_line
from tlog.sequencer import SEQUENCER

if TYPE_CHECKING:
    from tlog.sequencer import Log

log = logging.getLogger("tlog.election")


@dataclass(frozen=True)
class Term:
    """The lease as one campaign round found it."""

    token: int
    sequencer: str | None
    """The holder's advertised URL (None if nobody holds a live lease)."""
    ours: bool


class PostgresLease:
    """The sequencer lease row; one per `tlog serve` process. Methods block (run them in a
    thread); a database error propagates and means "unknown", not "lost"."""

    def __init__(self, url: str, advertise: str, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self._url = url
        self.advertise = advertise
        self.ttl = ttl
        self.holder = secrets.token_hex(8)
        self._db: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> psycopg.Connection:
        if self._db is None or self._db.closed:
            self._db = psycopg.connect(self._url, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT)
            # waiting on a write in flight is fine; waiting long is not a round
            self._db.execute(f"SET lock_timeout = '{max(1, int(self.ttl * 1000) // 4)}ms'")
        return self._db

    def campaign(self) -> Term:
        """One round: take or renew the lease when we may; the term as it now stands."""
        with self._lock:
            db = self._conn()
            row = db.execute(
                "UPDATE tlog_sequencer SET"
                " token = CASE WHEN holder = %(me)s THEN token ELSE token + 1 END,"
                " holder = %(me)s, url = %(url)s, backend_pid = pg_backend_pid(),"
                " expires = clock_timestamp() + %(ttl)s * interval '1 second'"
                " WHERE id = 1 AND (holder = %(me)s OR expires < clock_timestamp()"
                "  OR NOT EXISTS (SELECT 1 FROM pg_stat_activity"
                "                 WHERE pid = tlog_sequencer.backend_pid))"
                " RETURNING token",
                {"me": self.holder, "url": self.advertise, "ttl": self.ttl}).fetchone()
            if row is not None:
                return Term(row[0], self.advertise, True)
            row = db.execute("SELECT token, url, expires > clock_timestamp() "
                             "FROM tlog_sequencer WHERE id = 1").fetchone()
        if row is None:
            raise psycopg.DataError("the tlog_sequencer row is missing")
        return Term(row[0], row[1] if row[2] else None, False)

    def resign(self) -> None:
        """Let the lease go now (clean shutdown), so a replica takes over at its next round."""
        with self._lock:
            self._conn().execute("UPDATE tlog_sequencer SET expires = '-infinity' "
                                 "WHERE id = 1 AND holder = %s", (self.holder,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()


ROUNDS_PER_TTL = 6
"""Campaign rounds per lease ttl: the sequencer renews, and replicas look for a dead one."""


async def campaign(log: Log, lease: PostgresLease,
                   first_round: asyncio.Event | None = None) -> None:
    """Run campaign rounds for `log` until cancelled, switching its role as the lease says.

    A round that cannot reach the database changes nothing, except that the
    sequencer steps down once `ttl` has passed since the start of its last
    good round. Replicas refresh what they serve after every round.
    `first_round` is set once the first round is over (its role settled).
    """
    interval = lease.ttl / ROUNDS_PER_TTL
    held_until = 0.0
    problem = ""
    while True:
        started = time.monotonic()
        trouble = ""
        try:
            term: Term | None = await asyncio.to_thread(lease.campaign)
        except Exception as e:  # noqa: BLE001 - the database is down or slow: unknown
            term, trouble = None, f"lease round failed: {one_line(e)}"
        try:
            if term is not None and term.ours:
                held_until = started + lease.ttl
                if log.role != SEQUENCER or log.term != term.token:
                    await log.follow(term.sequencer)
                    await log.lead(term.token)
            elif term is not None or time.monotonic() >= held_until:
                await log.follow(term.sequencer if term is not None else None)
            if log.role != SEQUENCER:
                await log.refresh()
        except Exception as e:  # noqa: BLE001 - storage refused: stay a replica, retry
            trouble = trouble or f"{type(e).__name__}: {one_line(e)}"
        problem = _report(problem, trouble)
        if first_round is not None:
            first_round.set()
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def _report(last: str, now: str) -> str:
    """Log a campaign problem once when it appears and once when it clears."""
    if now and now != last:
        log.warning("%s", now)
    elif last and not now:
        log.info("campaign rounds work again")
    return now
