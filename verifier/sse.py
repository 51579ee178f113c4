"""Server-sent events, parsed as the WHATWG HTML standard says (pure, sans-I/O).

`SseParser.feed(bytes)` returns the events completed by those bytes; the
caller owns the socket. The rules (HTML, "Interpreting an event stream"):

- Lines end with CRLF, LF or CR (a CR at the end of one chunk and an LF at
  the start of the next are one line end). A UTF-8 BOM at the very start is
  skipped.
- An empty line dispatches the event being built. A line starting with `:`
  is a comment. Otherwise the field name runs up to the first `:` (the whole
  line if there is none) and one space after the colon is dropped.
- `data` appends its value and a LF to the data buffer; `event` sets the
  type; `id` sets the last event id unless the value holds NUL; `retry` sets
  the reconnection time when the value is all ASCII digits; other fields are
  ignored.
- On dispatch, a block whose data buffer is empty yields no event (a
  comment-only keep-alive, say); otherwise the final LF is dropped and the
  type defaults to `message`. Bytes after the last empty line at the end of
  the stream are an incomplete event: never dispatched (`rest()` returns them).

Invariant for relays: every byte fed is in exactly one event's `raw` or in
`rest()`, in order, so concatenating them gives the input back (a relay that
forwards `raw` unchanged forwards the exact bytes). Bytes of blocks that yield
no event are prefixed to the next event's `raw`; so is the LF of a CRLF whose
CR ended the previous chunk (the event was dispatched on the CR).

Work per byte is constant: a line terminator is searched for only in bytes
not searched before, and consumed bytes are dropped from the front of the
buffer (amortised O(1) for a `bytearray`). `max_event` bounds what one event
may buffer, so a hostile stream cannot make the parser hold unbounded memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_EVENT = 1 << 20
_EOL = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"


class SseError(ValueError):
    """The stream cannot be parsed safely (an event larger than the parser's limit)."""


@dataclass(frozen=True)
class Event:
    """One dispatched event; `raw` is every input byte since the previous event's end."""

    type: str
    data: bytes
    id: str | None  # the last event id at dispatch (it persists across events)
    raw: bytes


def encode(data: bytes, event: str | None = None) -> bytes:
    """The wire form of an event: `event:` (if not a plain message), one `data:` line per
    line of `data`, then the empty line. `data` must not contain CR."""
    if b"\r" in data:
        raise ValueError("SSE data must not contain CR")
    if event is not None and (event == "" or any(c in event for c in "\r\n")):
        raise ValueError("SSE event type must be one non-empty line")
    head = b"" if event in (None, "message") else b"event: " + event.encode() + b"\n"
    return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"


class SseParser:
    """Incremental event-stream parser: `feed` bytes, get completed `Event`s."""

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._max = max_event
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._event_start = 0  # where the next event's raw bytes begin in _buf
        self._line_start = 0  # where the line being read begins
        self._scan = 0  # bytes before this were searched for a line end already
        self._skip_lf = False  # a chunk ended in CR: an LF opening the next one belongs to it
        self._started = False
        self._data: list[bytes] = []
        self._type = b""
        self.last_event_id: str | None = None
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by `chunk` (SseError if one grows past the size limit)."""
        buf = self._buf
        buf += chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(bytes(buf)):
                return []
            self._started = True
            if buf.startswith(_BOM):
                self._line_start = self._scan = len(_BOM)
        out: list[Event] = []
        while True:
            if self._skip_lf and self._scan < len(buf):
                self._skip_lf = False
                if buf[self._scan] == 0x0A:
                    self._scan += 1
                    self._line_start = self._scan
                    continue
            m = _EOL.search(buf, self._scan)
            if m is None:
                break
            end = nxt = m.start()
            nxt += 1
            if buf[end] == 0x0D:
                if nxt == len(buf):
                    self._skip_lf = True
                elif buf[nxt] == 0x0A:
                    nxt += 1
            line = bytes(buf[self._line_start:end])
            self._line_start = self._scan = nxt
            ev = self._line(line, nxt)
            if ev is not None:
                out.append(ev)
        self._scan = len(buf)
        if len(buf) - self._event_start > self._max:
            raise SseError(f"an event exceeds {self._max} bytes")
        cut = self._event_start
        if cut and cut * 2 >= len(buf):  # drop consumed bytes (amortised: half the buffer)
            del buf[:cut]
            self._event_start = 0
            self._line_start -= cut
            self._scan -= cut
        return out

    def _line(self, line: bytes, end: int) -> Event | None:
        """Interpret one line; `end` is where its terminator ends in the buffer."""
        if not line:
            return self._dispatch(end)
        if line[0] == 0x3A:  # ":" starts a comment
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._type = value
        elif name == b"id":
            if b"\x00" not in value:
                self.last_event_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self, end: int) -> Event | None:
        data, self._data = self._data, []
        typ, self._type = self._type, b""
        if not data:
            return None
        raw = bytes(self._buf[self._event_start:end])
        self._event_start = end
        return Event(typ.decode("utf-8", "replace") or "message", b"\n".join(data),
                     self.last_event_id, raw)

    def rest(self) -> bytes:
        """The bytes after the last dispatched event (an incomplete event, or blocks that
        yielded none), for the end of the stream; the parser starts over."""
        out = bytes(self._buf[self._event_start:])
        self._reset()
        return out
