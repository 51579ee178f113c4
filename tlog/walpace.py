"""When a background thread folds a SQLite write-ahead log back (a passive checkpoint).

A passive checkpoint that copies the whole WAL back lets the next commit write the
WAL from its start again, and that commit first writes and fsyncs a new WAL header
(SQLite does so at synchronous=NORMAL as at FULL), on the committing thread. With a
checkpoint on every tick of a fixed period, a writer committing less often than that
period paid this fsync at every commit: at about 10 calls a second the gateway's event
loop ran one `fdatasync` a call (docs/benchmarks.md).

So a tick checkpoints only once the writer's commits since the last checkpoint weigh
`WEIGHT`: one each, and a writer whose commits vary in size (the log's batches) adds
to a large one's weight by its bytes, so that the WAL holds a bounded number of pages
before it is folded back. Under load that is every tick, as before; at a low rate the restart's
fsync comes once in `WEIGHT` small commits. Commits in the WAL stay as durable as the
database's `synchronous` setting makes them.

The pace is counted by the writer, not read from SQLite's WAL-index: opening and
closing the `-shm` file in the process, even to read it, drops the POSIX locks SQLite
holds on it, and another process may then reset it under a writer that has it mapped
(the soak test's gateway died of SIGBUS that way).
"""

from __future__ import annotations

WEIGHT = 64
"""The weight of commits since the last checkpoint that makes the next tick run one."""


class Pace:
    """Commits weighed by the one writer (`committed`), read by the checkpoint thread
    (`due`). The total only grows, and only the writer's thread changes it, so the other
    thread's read of it needs no lock."""

    def __init__(self) -> None:
        self.weight = WEIGHT  # read when made, so a test can set the module's value
        self._made = 0  # the weight of the commits so far
        self._done = 0  # of it, made before the last checkpoint

    def committed(self, weight: int = 1) -> None:
        """Count one committed write transaction, of `weight` (at least 1)."""
        self._made += max(1, weight)

    def due(self) -> bool:
        """Whether a checkpoint should run now; True also counts it as run."""
        made = self._made
        if made - self._done < self.weight:
            return False
        self._done = made
        return True
