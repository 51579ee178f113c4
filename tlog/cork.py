"""Corked HTTP connections: a response head leaves in one system call with what follows it.

uvicorn writes a response's head when the app sends `http.response.start` and its
body on `http.response.body`: two `send` system calls, two TCP segments and two
wake-ups of the client for every whole answer. `CorkedTransport` holds a write
that ends like an HTTP head (CRLF CRLF) until the next write, which leaves joined
with it, or until the end of the loop turn (`loop.call_soon`). Every other write
leaves at once: a stream's events are never held behind the work the app does
before it next yields (the gateway: reading further upstream chunks already
buffered, the receipt), so corking costs a stream's first chunk nothing. Every
service's uvicorn serves through it (`tlog.service.uvicorn_config`).

Invariants:
- Bytes leave in the order written, none dropped while the connection is open:
  `close`, `write_eof` and `set_protocol` send what is held first; `abort`
  discards it, as aborting a transport discards its buffer.
- At most one write is held, and never past the loop turn it was written in.
- Flow control is the real transport's: it pauses the protocol as before,
  counting bytes from the moment they are handed over.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CorkedTransport(asyncio.Transport):
    """A transport over `inner` whose writes are joined until the end of the loop turn."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._inner = inner
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` joined with a held head; hold it if it ends like a head."""
        if not data:
            return
        if self._held:
            self._held.append(bytes(data))
            self.flush()
        elif bytes(data[-4:]) == b"\r\n\r\n":
            self._held.append(bytes(data))
            self._loop.call_soon(self.flush)
        elif not self._inner.is_closing():
            self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        """Hold each piece, as `write` does."""
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is held to the real transport, in one write (a no-op when nothing is)."""
        if not self._held:
            return
        held, self._held = self._held, []
        if not self._inner.is_closing():
            self._inner.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        """Send what is held, then close."""
        self.flush()
        self._inner.close()

    def abort(self) -> None:
        """Drop what is held and abort."""
        self._held = []
        self._inner.abort()

    def write_eof(self) -> None:
        """Send what is held, then half-close."""
        self.flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        """As the real transport."""
        return self._inner.can_write_eof()

    def is_closing(self) -> bool:
        """As the real transport."""
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the real transport (peer and socket names, the TLS object)."""
        return self._inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Send what is held, then hand the connection to `protocol`."""
        self.flush()
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """As the real transport."""
        return self._inner.get_protocol()

    def pause_reading(self) -> None:
        """As the real transport."""
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        """As the real transport."""
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        """As the real transport."""
        return self._inner.is_reading()

    def get_write_buffer_size(self) -> int:
        """Bytes held here and in the real transport's buffer."""
        return sum(map(len, self._held)) + self._inner.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As the real transport."""
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """As the real transport."""
        return self._inner.get_write_buffer_limits()


def corked(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol` (an HTTP server protocol class) over a `CorkedTransport`."""

    class Corked(protocol):  # type: ignore[valid-type,misc]
        """`protocol` writing through a `CorkedTransport`."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(CorkedTransport(transport,  # type: ignore[arg-type]
                                                    asyncio.get_running_loop()))

    Corked.__name__ = Corked.__qualname__ = f"Corked{protocol.__name__}"
    return Corked
