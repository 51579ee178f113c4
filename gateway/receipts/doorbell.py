"""The doorbells between `gateway serve` and the shipper process it starts: two pipes.

- Outbox news (gateway to shipper): the gateway writes a byte after each outbox
  commit; the shipper, after a spell with nothing to ship, waits for a byte instead
  of reading the outbox every few milliseconds. An idle shipper then stays asleep; it
  used to read the outbox 500 times a second.
- Ledger news (shipper to gateway): the shipper writes a byte after each ledger
  commit (acknowledgements, its state); the gateway's `LogStatus` reads the ledger
  when rung: the shipper's state (is the log down) instead of every 50 ms, and, while
  calls wait for their receipt to be logged (`require_log_inclusion`), their
  acknowledgements instead of every 2 ms. A waiting call then learns of its proof as
  soon as it is stored, the gateway reads the ledger once per commit, not 4-5 times
  per call, and an idle gateway reads it once a second.

Both are hints, never channels of record: what to ship and what is logged are still
read from the outbox and the ledger, and a listener still looks at least every
fallback period (IDLE_POLL, ACK_POLL), so a ring that is lost delays a receipt or an
answer by at most that, and loses nothing.

Invariants:
- Each shipper process gets pipes of its own, inherited as descriptors (`--bell-fd`,
  `--ack-fd`): no file in the data directory, nothing another process can open.
- `ring` costs one non-blocking write. A full pipe means a ring is waiting already; a
  reader gone (EPIPE: the other process exited) detaches the pipe. Errors are
  swallowed: a commit never fails because of a bell.
- A listener hears a ring only while it waits, so under load the rings cost it
  nothing. At end of file (the other end closed) it goes back to polling.
- A `Bell` closed while a wait is in progress (on the loop's thread: the gateway
  swaps in a restarted shipper's pipe) ends that wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable

IDLE_POLL = 1.0  # seconds an idle listener (a shipper with nothing to ship, the gateway with
# no call waiting for the log) waits for a ring before it looks anyway
IDLE_LOOKS = 50  # looks in a row that found nothing (about 0.1 s) before the shipper waits
ACK_POLL = 0.1  # seconds the gateway waits for the ledger's ring, while calls wait for it,
# before it looks anyway (IDLE_POLL while none do)


class Ringer:
    """The writing side (the outbox's in the gateway, the ledger's in the shipper): `attach`
    each new pipe, `ring` after each commit. Safe across threads (an "fsync" outbox rings
    from its writer thread): a descriptor is never written after it is closed, so never
    into a file that reused its number."""

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
        """Tell the other process there is news; never blocks or raises."""
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
    """The listening side (the shipper's, the gateway's `LogStatus`), over a pipe's read end
    (taken over; None: no bell, poll)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._waiting: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None
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
        self._waiting = (loop, wake)
        timer = loop.call_later(timeout, wake)
        try:
            await rung
        finally:
            timer.cancel()
            if self._fd == fd:  # else `close` ended the wait and stopped reading
                loop.remove_reader(fd)
                self._waiting = None
        if self._fd != fd:
            return
        with contextlib.suppress(BlockingIOError):
            while True:
                if not os.read(fd, 4096):  # end of file: the other process closed its end
                    self.close()
                    return

    def poke(self) -> None:
        """End a wait in progress now, as a ring would (on the loop's thread)."""
        if self._waiting is not None:
            self._waiting[1]()

    def close(self) -> None:
        """Stop listening (on the loop's thread): a wait in progress ends at once."""
        if self._fd is not None:
            if self._waiting is not None:
                loop, wake = self._waiting
                self._waiting = None
                loop.remove_reader(self._fd)
                wake()
            os.close(self._fd)
            self._fd = None
