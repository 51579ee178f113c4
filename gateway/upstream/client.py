"""Talking to providers over `tlog.http1` (the strict pooled HTTP/1.1 client: llhttp
parsing, deadlines, caps, TLS pins checked on the handshake; its rules are stated
there). This module holds what is the gateway's own:

- `Upstream`: forwards a model call to a route's provider (`_Target` caches each
  route's request head), retries on connection errors, timeouts, malformed answers
  and 5xx, and maps every failure to a GatewayError 502/504 with a stable code,
  never a 500; a route bound to a TLS key is reached only if the handshake shows it.
- `UpstreamReply`: a provider's answer, whole or as a live stream.
- `EventClock`: where server-sent events end in a stream, so a stream ends when no
  event completes within the route's `event_timeout` or when it outlives its
  `stream_timeout`; a line over `max_sse_line_bytes` is a `ProtocolError`.

Time: connect and headers (and the whole body of a non-streaming call) share one
deadline, the route `timeout`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.api.config import RouteSpec
from gateway.api.errors import GatewayError, refused
from gateway.upstream.leases import LeaseFacts
from tlog.http1 import BindingError, Connection, Pool, ProtocolError, exchange

_LINE_ENDS = re.compile(rb"[\r\n]+")


class EventClock:
    """Where server-sent events end in a byte stream, and how long its lines are.

    An event (or a comment block) ends at an empty line: two line ends (CRLF, LF
    or CR) in a row. `feed` is linear in its input and keeps O(1) state."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._line = 0  # bytes of the unfinished line
        self._run = b""  # the line ends the previous chunk finished with

    def feed(self, chunk: bytes) -> bool:
        """Whether an event ended in `chunk`; ProtocolError if a line exceeds the cap."""
        ended = False
        pos = 0
        for m in _LINE_ENDS.finditer(chunk):
            run = m.group()
            if m.start() == 0 and self._line == 0:
                run = self._run + run
            elif self._line + m.start() - pos > self._max_line:
                raise ProtocolError(f"an event-stream line over {self._max_line} bytes")
            ended = ended or run.count(b"\n") + run.count(b"\r") - run.count(b"\r\n") >= 2
            self._line, pos = 0, m.end()
            self._run = run[-2:]
        if pos < len(chunk):
            self._line += len(chunk) - pos
            self._run = b""
            if self._line > self._max_line:
                raise ProtocolError(f"an event-stream line over {self._max_line} bytes")
        return ended


@dataclass
class UpstreamReply:
    """A provider's answer: status, content type, and either whole bytes or a live stream."""

    status: int
    content_type: str
    body: bytes
    conn: Connection | None = None
    pool: Pool | None = None
    route: RouteSpec | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lower-case names

    @property
    def streaming(self) -> bool:
        """Whether the body is still to be read with `chunks()`."""
        return self.conn is not None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The streamed body as received, piece by piece; TimeoutError once no event
        completed within the route's `event_timeout` or the stream outlived its
        `stream_timeout`. The connection is pooled after a clean end, else dropped."""
        assert self.conn is not None and self.pool is not None and self.route is not None  # noqa: S101 - type narrowing: set when the connection was taken
        route = self.route
        gap = route.event_timeout or route.timeout
        loop = asyncio.get_running_loop()
        clock = EventClock(route.max_sse_line_bytes)
        end = loop.time() + route.stream_timeout
        next_event = loop.time() + gap
        done = False
        try:
            while piece := await self.conn.read(min(end, next_event)):
                if clock.feed(piece):
                    next_event = loop.time() + gap
                yield piece
            done = True
        finally:
            if done:
                self.pool.release(self.conn)
            else:
                self.conn.close()


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls: bool
    heads: dict[bool, bytes]


class Upstream:
    """Forwards requests to providers over one pool of keep-alive connections."""

    def __init__(self) -> None:
        self._pool = Pool()
        self._targets: dict[tuple[str, str], _Target] = {}

    def _target(self, route: RouteSpec, path: str) -> _Target:
        t = self._targets.get((route.id, path))
        if t is None:
            u = urlsplit(route.base_url + path)
            tls = u.scheme == "https"
            auth = f"Authorization: Bearer {route.api_key}\r\n" if route.api_key else ""
            heads = {stream: (
                f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                "Content-Type: application/json\r\n"
                f"Accept: {'text/event-stream' if stream else 'application/json'}\r\n{auth}"
            ).encode() for stream in (False, True)}
            t = self._targets[(route.id, path)] = _Target(
                u.hostname or "", u.port or (443 if tls else 80), tls, heads)
        return t

    async def send(self, route: RouteSpec, lease: LeaseFacts, path: str, body: bytes,
                   stream: bool, headers: dict[str, str] | None = None) -> UpstreamReply:
        """POST `body` to `route.base_url + path` (with extra `headers`, e.g. the provider
        E2EE ones); retries on connection errors, timeouts, malformed answers and 5xx.
        Connect, head and (unless streaming) the whole body share one deadline: the route
        `timeout`."""
        t = self._target(route, path)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode("latin-1")
        data = t.heads[stream] + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body
        target = (t.host, t.port, t.tls, lease.pin)
        last: GatewayError | None = None
        for _ in range(route.retries + 1):
            conn: Connection | None = None
            try:
                async with asyncio.timeout(route.timeout):
                    conn, status, answer = await exchange(
                        self._pool, target, data, body_limit=route.max_response_bytes)
                    ctype = answer.get(b"content-type", b"application/json").decode("latin-1")
                    if stream and status == 200:
                        return UpstreamReply(status, ctype, b"", conn, self._pool, route,
                                             answer)
                    payload = await conn.body()
                self._pool.release(conn)
            except BindingError as e:
                raise refused(502, "binding_mismatch",
                              f"route {route.id!r} refused: binding_mismatch: provider TLS key "
                              "is not the attested one", route_id=route.id) from e
            except TimeoutError:
                if conn is not None:
                    conn.close()
                last = refused(504, "upstream_timeout",
                               f"route {route.id!r}: provider did not answer in time",
                               route_id=route.id)
                continue
            except ProtocolError as e:
                if conn is not None:
                    conn.close()
                last = refused(502, "upstream_bad_response",
                               f"route {route.id!r}: provider answered malformed HTTP: {e}",
                               route_id=route.id)
                continue
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                if conn is not None:
                    conn.close()
                last = refused(502, "upstream_unreachable",
                               f"route {route.id!r}: provider unreachable or closed the "
                               "connection mid-answer", route_id=route.id)
                continue
            if status >= 500:
                last = refused(502, "upstream_error",
                               f"route {route.id!r}: provider answered HTTP {status}",
                               route_id=route.id)
                continue
            return UpstreamReply(status, ctype, payload, headers=answer)
        assert last is not None  # noqa: S101 - type narrowing: the loop ran at least once
        raise last

    async def close(self) -> None:
        """Drop pooled connections."""
        self._pool.close()
