"""Talking to providers: a pooled HTTP/1.1 client whose answers are parsed by llhttp
(`httptools`, the parser under uvicorn), with deadlines on every call.

A provider is untrusted input on a pooled keep-alive connection, which is where
request/response desync lives. So:

- A TLS SPKI binding is checked on the TLS handshake, before any request byte
  is written; a route bound to a TLS key but reached over plain HTTP is refused.
- llhttp parses strictly: duplicate or conflicting Content-Length, Content-Length
  beside Transfer-Encoding, obs-fold, malformed chunk sizes or trailers are errors.
  This module adds: a status outside 100..599, 101, an HTTP version other than
  1.0/1.1, a repeated Transfer-Encoding or one other than `chunked`, a content
  coding, more than MAX_HEAD bytes of framing without a body byte (head, chunk
  lines, trailers), a body over its cap (a larger Content-Length is refused before
  any body byte is read), and any byte after the end of a response (a body longer
  than its Content-Length, a second response, data on an idle pooled connection).
  Each is a `ProtocolError`, and that connection is closed, never pooled again.
- A connection returns to the pool only after its response ended cleanly, both
  sides keep-alive, and nothing arrived since.
- Memory: a whole body is held up to its cap; a stream is read with backpressure
  (the socket pauses once HIGH_WATER bytes wait unread).
- Time: deadlines, not only per-read timeouts. Connect and headers (and the
  whole body of a non-streaming call) within the route `timeout`; a stream ends
  when no SSE event completes within `event_timeout` or when it outlives
  `stream_timeout`.
- Upstream failures become GatewayError 502/504 with stable codes, never 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.api.config import RouteSpec
from gateway.api.errors import GatewayError, refused
from gateway.upstream.leases import LeaseFacts


class ProtocolError(Exception):
    """The peer's HTTP answer is malformed, too large, or breaks message framing."""


class BindingError(Exception):
    """The peer's TLS key is not the one the lease binds."""


MAX_BODY = 64 << 20  # default cap on one response body
MAX_HEAD = 64 << 10  # bytes of framing (status line, headers, chunk lines, trailers) in a row
MAX_SSE_LINE = 1 << 20  # default cap on one line of an event stream
HIGH_WATER = 256 << 10  # unread body bytes at which the socket stops being read


def spki_sha256(der_cert: bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo of a DER certificate."""
    spki = x509.load_der_x509_certificate(der_cert).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def pin_matches(der_cert: bytes | None, pin: tuple[str, bytes]) -> bool:
    """Whether the peer certificate satisfies a `pin_of` pin."""
    if der_cert is None:
        return False
    kind, digest = pin
    have = spki_sha256(der_cert) if kind == "spki" else hashlib.sha256(der_cert).digest()
    return hmac.compare_digest(have, digest)


class _Response:
    """One response as llhttp reports it (the parser's callbacks), for one request.

    Interim 1xx answers are skipped; the final answer's head, body pieces and
    end are recorded. A callback raising ProtocolError stops the parser."""

    def __init__(self, parser_of: Callable[[], httptools.HttpResponseParser],
                 body_limit: int) -> None:
        self._parser_of = parser_of
        self.body_limit = body_limit
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.head_done = False
        self.eof_body = False  # the body ends where the connection does
        self.keep = False
        self.complete = False
        self.pieces: deque[bytes] = deque()
        self.unread = 0
        self.received = 0
        self.framing = 0  # bytes fed since the last body byte

    def on_message_begin(self) -> None:
        if self.head_done:
            raise ProtocolError("a second response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field: well-formed (llhttp checked it), not used
        name = name.lower()
        if name == b"transfer-encoding" and name in self.headers:
            raise ProtocolError("repeated Transfer-Encoding")
        self.headers[name] = value.strip()

    def on_headers_complete(self) -> None:
        parser = self._parser_of()
        status = parser.get_status_code()
        if not 100 <= status <= 599 or status == 101:
            raise ProtocolError(f"unusable status {status}")
        if parser.get_http_version() not in ("1.0", "1.1"):
            raise ProtocolError("not HTTP/1.0 or HTTP/1.1")
        if status < 200:
            self.headers = {}  # an interim answer: the final one follows
            return
        h = self.headers
        te = h.get(b"transfer-encoding")
        if te is not None and te.lower() != b"chunked":
            raise ProtocolError("transfer coding other than chunked")
        if h.get(b"content-encoding", b"identity").lower() != b"identity":
            raise ProtocolError("content coding (the gateway relays bytes as received)")
        length = h.get(b"content-length")
        if length is not None and int(length) > self.body_limit:
            raise ProtocolError(f"response body over {self.body_limit} bytes")
        self.status = status
        self.head_done = True
        self.keep = parser.should_keep_alive()
        self.eof_body = te is None and length is None and status not in (204, 304)

    def on_body(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.body_limit:
            raise ProtocolError(f"response body over {self.body_limit} bytes")
        self.pieces.append(data)
        self.unread += len(data)
        self.framing = 0

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection; one request at a time.

    `request` sends a request and waits for the answer's head; `read` returns the
    body piece by piece (b"" at its end); `reusable` says whether it may be pooled."""

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._response: _Response | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        resp, parser = self._response, self._parser
        if resp is None or parser is None or resp.complete:
            self._fail(ProtocolError("bytes after the end of a response"))
            return
        before = resp.received
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause if isinstance(cause, ProtocolError)
                       else ProtocolError(f"malformed HTTP answer: {e}"))
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(ProtocolError(f"malformed HTTP answer: {e}"))
            return
        if resp.received == before and not resp.complete:
            resp.framing += len(data)
            if resp.framing > MAX_HEAD:
                self._fail(ProtocolError(f"over {MAX_HEAD} bytes of head, chunk framing "
                                         "or trailers"))
                return
        if resp.unread > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> bool:
        resp = self._response
        if resp is not None and resp.head_done and resp.eof_body and not resp.complete:
            resp.complete = True
            resp.keep = False
        self._end(ConnectionResetError("provider closed the connection mid-answer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionResetError("provider closed the connection mid-answer"))

    def _end(self, exc: BaseException) -> None:
        self.closed = True
        resp = self._response
        if resp is not None and not resp.complete and self._error is None:
            self._error = exc
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        """Record the error for the reader and drop the connection at once."""
        if self._error is None:
            self._error = exc
        self.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, deadline: float | None) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout_at(deadline):
                await self._waiter
        finally:
            self._waiter = None

    # -- the caller's side ---------------------------------------------------------

    @property
    def keep(self) -> bool:
        """Whether both sides keep the connection alive after the current answer."""
        return self._response is not None and self._response.keep

    @property
    def reusable(self) -> bool:
        """Whether this connection may carry another request: its answer ended cleanly
        with keep-alive, it is open, and nothing arrived since."""
        r = self._response
        return (r is not None and r.complete and r.keep and self._error is None
                and not self.closed and not r.pieces)

    async def request(self, data: bytes, deadline: float | None = None,
                      body_limit: int = MAX_BODY) -> tuple[int, dict[bytes, bytes]]:
        """Send a whole request; return the answer's (status, lower-cased headers) once its
        head arrived (TimeoutError at the loop-time `deadline`)."""
        if self.closed or self.transport is None:
            raise ConnectionResetError("connection closed before the request")
        resp = self._response = _Response(lambda: parser, body_limit)
        parser = self._parser = httptools.HttpResponseParser(resp)
        self._error = None
        self.transport.write(data)
        while not resp.head_done:
            if self._error is not None:
                raise self._error
            await self._wait(deadline)
        return resp.status, resp.headers

    async def read(self, deadline: float | None = None) -> bytes:
        """The next piece of the body as received (de-chunked); b"" once it ended."""
        resp = self._response
        assert resp is not None and resp.head_done  # noqa: S101 - type narrowing: the head was parsed before the body is read
        while True:
            if resp.pieces:
                piece = resp.pieces.popleft()
                resp.unread -= len(piece)
                if self._paused and resp.unread <= HIGH_WATER // 4 and not self.closed:
                    self._paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return piece
            if self._error is not None:
                raise self._error
            if resp.complete:
                return b""
            await self._wait(deadline)

    async def body(self, deadline: float | None = None) -> bytes:
        """The whole body (the cap was set with the request)."""
        out = bytearray()
        while piece := await self.read(deadline):
            out += piece
        return bytes(out)

    async def stream(self, deadline: float | None = None) -> AsyncIterator[bytes]:
        """The body piece by piece, as it arrives."""
        while piece := await self.read(deadline):
            yield piece

    def close(self) -> None:
        """Drop the connection (unsent bytes are discarded)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Pool:
    """Idle keep-alive connections per (host, port, TLS, pinned SPKI)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[Any, ...], list[Connection]] = {}
        self._verify = ssl.create_default_context()
        self._pinned = ssl.create_default_context()
        self._pinned.check_hostname = False
        self._pinned.verify_mode = ssl.CERT_NONE

    async def connect(self, host: str, port: int, tls: bool, pin: tuple[str, bytes] | None,
                      fresh: bool = False) -> tuple[Connection, bool]:
        """(connection, whether it was reused); the pin is checked before it is returned."""
        key = (host, port, tls, pin)
        idle = self._idle.get(key)
        while idle and not fresh:
            conn = idle.pop()
            if conn.reusable:
                return conn, True
            conn.close()
        ctx = (self._pinned if pin is not None else self._verify) if tls else None
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(lambda: Connection(key), host, port,
                                                       ssl=ctx)
        if pin is not None:
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if not pin_matches(der, pin):
                conn.close()
                raise BindingError("peer TLS key differs from the lease binding")
        return conn, False

    def release(self, conn: Connection) -> None:
        """Pool a connection whose answer was read to its clean end; drop any other."""
        if conn.reusable:
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop every idle connection."""
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()


async def exchange(pool: Pool, target: tuple[str, int, bool, tuple[str, bytes] | None],
                   data: bytes, deadline: float | None = None, body_limit: int = MAX_BODY
                   ) -> tuple[Connection, int, dict[bytes, bytes]]:
    """Send a request on a pooled connection (once more on a fresh one if a reused
    connection turns out to be closed before any answer byte)."""
    conn, reused = await pool.connect(*target)
    try:
        status, headers = await conn.request(data, deadline, body_limit)
    except ConnectionError:
        conn.close()
        if not reused:
            raise
        conn, _ = await pool.connect(*target, fresh=True)
        try:
            status, headers = await conn.request(data, deadline, body_limit)
        except BaseException:
            conn.close()
            raise
    except BaseException:
        conn.close()
        raise
    return conn, status, headers


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
