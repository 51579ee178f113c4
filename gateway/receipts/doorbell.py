"""The gateway's doorbell for its shipper: a pipe from `gateway serve` to the shipper
process it starts.

The gateway writes a byte to the pipe after each outbox commit (`Ringer.ring`: never
blocking, never raising); the shipper, after a spell with nothing to ship, waits for
a byte (`Bell.wait`) instead of reading the outbox every few milliseconds. An idle
shipper then stays asleep; it used to read the outbox 500 times a second.

It is a hint, never a channel of record: what to ship is still read from the outbox,
and a waiting shipper still looks at least every IDLE_POLL seconds, so a ring that is
lost delays a receipt by at most that, and loses nothing.

Invariants:
- Each shipper process gets a pipe of its own, inherited as a descriptor
  (`--bell-fd`): no file in the data directory, nothing another process can open.
- `ring` costs one non-blocking write. A full pipe means a ring is waiting already; a
  reader gone (EPIPE: the shipper exited) detaches the pipe. Errors are swallowed: a
  commit never fails because of the bell.
- The shipper listens only while it waits, so under load the rings cost it nothing.
  At end of file (the gateway closed its end) it goes back to polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading

IDLE_POLL = 1.0  # seconds a waiting shipper sleeps without a ring before it looks anyway
IDLE_LOOKS = 50  # looks in a row that found nothing (about 0.1 s) before the shipper waits


class Ringer:
    """The gateway's side: `attach` each new shipper's pipe, `ring` after each commit. Safe
    across threads (an "fsync" outbox rings from its writer thread): a descriptor is never
    written after it is closed, so never into a file that reused its number."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()

    def attach(self, fd: int) -> None:
        """Ring into `fd` (a pipe's write end, taken over) from now on."""
        os.set_blocking(fd, False)
        with self._lock:
            self._close()
            self._fd = fd

    def ring(self) -> None:
        """Tell the shipper that the outbox has news; never blocks or raises."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, b"\0")
            except BlockingIOError:  # the pipe is full: a ring is waiting already
                pass
            except OSError:  # the shipper is gone (EPIPE): nobody to ring until the next
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Bell:
    """The shipper's side, over the pipe's read end (taken over; None: no bell, poll)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    @property
    def listening(self) -> bool:
        return self._fd is not None

    async def wait(self, timeout: float) -> None:
        """Until a ring, or `timeout` seconds. A ring that came before this call (since the
        last `wait` returned) ends it at once: one early return after a busy spell, and
        never a ring missed between a look and the wait."""
        fd = self._fd
        assert fd is not None  # noqa: S101 - the caller checks `listening`
        loop = asyncio.get_running_loop()
        rung: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not rung.done():
                rung.set_result(None)

        loop.add_reader(fd, wake)
        timer = loop.call_later(timeout, wake)
        try:
            await rung
        finally:
            timer.cancel()
            loop.remove_reader(fd)
        with contextlib.suppress(BlockingIOError):
            while True:
                if not os.read(fd, 4096):  # end of file: the gateway closed its end
                    self.close()
                    return

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
