"""When a background thread folds a SQLite write-ahead log back (a passive checkpoint).

A passive checkpoint that copies the whole WAL back lets the next commit write the
WAL from its start again, and that commit first writes and fsyncs a new WAL header
(SQLite does so at synchronous=NORMAL as at FULL), on the committing thread. With a
checkpoint on every tick of a fixed period, a writer committing less often than that
period paid this fsync at every commit: at about 10 calls a second the gateway's event
loop ran one `fdatasync` a call (docs/benchmarks.md).

So a tick checkpoints only once `BYTES` of pages wait in the WAL to be copied back.
Under load that is every tick, as before; at a low rate the restart's fsync comes once
per `BYTES` written; and the WAL never holds much more than `BYTES` (plus a tick's
writes) that a checkpoint could have copied back, however many pages each commit
writes. Commits in it stay as durable as the database's `synchronous` setting makes
them.

The bytes waiting are read from the WAL-index header SQLite keeps in the `-shm` file
beside the database: the WAL's last valid frame (`mxFrame`) less the frames already
copied back (`nBackfill`), times the page size (the layout of
https://sqlite.org/walformat.html, which every SQLite version sharing a database file
must agree on). A header read while a writer changes it can be off; the next tick reads
it again.
"""

from __future__ import annotations

import struct
from pathlib import Path

BYTES = 2 << 20
"""Bytes of WAL pages not yet copied back that make the next tick run a checkpoint."""

_HEADER = 100  # bytes of the -shm file read: the first header copy and nBackfill
_PAGE_SIZE = struct.Struct("=H")  # at 14: the page size (1 means 65536), native order
_MX_FRAME = struct.Struct("=I")  # at 16: the last valid frame
_BACKFILLED = struct.Struct("=I")  # at 96: frames copied back into the database


class Pace:
    """Whether the WAL of the database at `path` holds enough to fold back (`due`), for
    its checkpoint thread. `limit`, if given, lowers the threshold to a quarter of it (a
    WAL limit below 4 * BYTES still sees checkpoints before the limit)."""

    def __init__(self, path: str | Path, limit: int | None = None) -> None:
        self.threshold = BYTES if limit is None else max(1, min(BYTES, limit // 4))
        self._shm = Path(f"{path}-shm")

    def waiting(self) -> int:
        """Bytes of WAL pages not yet copied back (0 with no WAL-index yet)."""
        try:
            with self._shm.open("rb") as f:
                head = f.read(_HEADER)
        except OSError:
            return 0
        if len(head) < _HEADER:
            return 0
        page = _PAGE_SIZE.unpack_from(head, 14)[0]
        frames = _MX_FRAME.unpack_from(head, 16)[0] - _BACKFILLED.unpack_from(head, 96)[0]
        return max(0, frames) * (65536 if page == 1 else page)

    def due(self) -> bool:
        """Whether a checkpoint should run now."""
        return self.waiting() >= self.threshold
