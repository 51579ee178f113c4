"""When a background thread folds a SQLite write-ahead log back (a passive checkpoint).

A passive checkpoint that copies the whole WAL back lets the next commit write the
WAL from its start again, and that commit first writes and fsyncs a new WAL header
(SQLite does so at synchronous=NORMAL as at FULL), on the committing thread. With a
checkpoint on every tick of a fixed period, a writer committing less often than that
period paid this fsync at every commit: at about 10 calls a second the gateway's event
loop ran one `fdatasync` a call (docs/benchmarks.md).

So a tick checkpoints only once `COMMITS` commits were made since the last
checkpoint. Under load that is every tick, as before; at a low rate the restart's
fsync comes once in `COMMITS` commits. The WAL then holds at most the pages of
`COMMITS` commits, plus those of one tick, before the thread folds them back; commits
already in it stay as durable as the database's `synchronous` setting makes them.
"""

from __future__ import annotations

COMMITS = 64
"""Commits since the last checkpoint that make the next tick run one."""


class Pace:
    """Commits counted by the one writer (`committed`), read by the checkpoint thread
    (`due`). The count only grows, and only the writer's thread changes it, so the
    other thread's read of it needs no lock."""

    def __init__(self) -> None:
        self.commits = COMMITS  # read when made, so a test can set the module's value
        self._made = 0  # commits so far
        self._done = 0  # of them, made before the last checkpoint

    def committed(self) -> None:
        """Count one committed write transaction."""
        self._made += 1

    def due(self) -> bool:
        """Whether a checkpoint should run now; True also counts it as run."""
        made = self._made
        if made - self._done < self.commits:
            return False
        self._done = made
        return True
