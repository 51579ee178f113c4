"""The gateway's doorbell for its shipper: a FIFO (`shipper.bell`) in the data directory.

The gateway rings it after each outbox commit (`Ringer.ring`: one byte, never
blocking, never raising); the shipper, when it found nothing to ship, waits for a
ring (`Bell.wait`) instead of reading the outbox again every few milliseconds. An
idle shipper then stays asleep; it used to read the outbox 500 times a second.

It is a hint, never a channel of record: what to ship is still read from the outbox,
and the shipper still looks at least every IDLE_POLL seconds, so a ring that is lost
(no shipper listening yet, a shipper restarting) delays a receipt by at most that,
and loses nothing.

Invariants:
- `ring` costs one non-blocking write, or nothing while no shipper listens (the
  FIFO is reopened at most once per REOPEN seconds); a full pipe means a ring is
  already waiting. Errors are swallowed: a commit never fails because of the bell.
- The shipper makes the FIFO (mode 0600) in the private data directory and keeps a
  write end of its own, so its read end never sees end-of-file. Neither side opens
  anything at that path that is not a FIFO, nor follows a symbolic link there; the
  shipper then polls as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from pathlib import Path

BELL_FILE = "shipper.bell"
IDLE_POLL = 1.0  # seconds an idle shipper sleeps without a ring before it looks anyway
IDLE_LOOKS = 50  # looks in a row that found nothing (about 0.1 s) before the shipper waits
REOPEN = 1.0  # seconds between the gateway's tries to reach a shipper that is not there

log = logging.getLogger("gateway.receipts.doorbell")


def _open_fifo(path: Path, flags: int) -> int | None:
    """A descriptor of the FIFO at `path` (non-blocking), or None if there is none."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # absent, a link, or (writing) no reader yet
        return None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class Ringer:
    """The gateway's side: `ring` after a commit."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / BELL_FILE
        self._fd: int | None = None
        self._retry_at = float("-inf")  # monotonic time of the next try to open

    def ring(self) -> None:
        """Tell a listening shipper that the outbox has news; never blocks or raises."""
        if self._fd is None:
            now = time.monotonic()
            if now < self._retry_at:
                return
            self._retry_at = now + REOPEN
            self._fd = _open_fifo(self._path, os.O_WRONLY)
            if self._fd is None:
                return
        try:
            os.write(self._fd, b"\0")
        except BlockingIOError:  # the pipe is full: a ring is waiting already
            pass
        except OSError:  # the shipper went away (EPIPE): try again later
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Bell:
    """The shipper's side: `open` once on its loop, then `wait` after each look at the
    outbox that found nothing. The shipper listens only while it waits: under load it
    never looks at the pipe, and the rings of that time cost it nothing (a full pipe
    drops further rings, which is as good as a ring)."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / BELL_FILE
        self._fds: tuple[int, int] | None = None

    @property
    def listening(self) -> bool:
        return self._fds is not None

    def open(self) -> bool:
        """Make the FIFO if need be; False (the shipper polls) if it cannot listen there."""
        try:
            os.mkfifo(self._path, 0o600)
        except FileExistsError:
            pass  # an earlier shipper's (or something else: checked next)
        except OSError as e:
            log.warning("no doorbell (%s): polling the outbox instead", e)
            return False
        r = _open_fifo(self._path, os.O_RDONLY)
        w = _open_fifo(self._path, os.O_WRONLY) if r is not None else None
        if r is None or w is None:
            if r is not None:
                os.close(r)
            log.warning("no doorbell: %s is not a FIFO; polling the outbox instead",
                        self._path)
            return False
        self._fds = (r, w)
        return True

    async def wait(self, timeout: float) -> None:
        """Until a ring, or `timeout` seconds. A ring that came before this call (since the
        last `wait` returned) ends it at once: one early return after a busy spell, never
        a ring missed between the look and the wait."""
        assert self._fds is not None  # noqa: S101 - the caller checks `listening`
        loop = asyncio.get_running_loop()
        rung: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not rung.done():
                rung.set_result(None)

        loop.add_reader(self._fds[0], wake)
        timer = loop.call_later(timeout, wake)
        try:
            await rung
        finally:
            timer.cancel()
            loop.remove_reader(self._fds[0])
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fds[0], 4096):
                pass

    def close(self) -> None:
        """Stop (the FIFO stays for the next shipper)."""
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
