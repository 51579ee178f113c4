"""A strict pooled HTTP/1.1 client: answers parsed by llhttp (`httptools`, the parser
under uvicorn), deadlines and caps on every call, keep-alive connections reused only
when nothing about them is in doubt.

It imports nothing of its callers: the gateway reaches providers with it
(`gateway.upstream`), the receipt shipper reaches the log, and the log reaches its
witnesses (`tlog.witnessing`). A peer is untrusted input on a pooled keep-alive
connection, which is where request/response desync lives. So:

- A TLS pin (`("spki", sha256 of the SubjectPublicKeyInfo)`, or any other kind: the
  sha256 of the whole certificate) is checked on the TLS handshake, before any
  request byte is written (`BindingError` otherwise). Without a pin, TLS verifies
  the certificate and host name with the default SSL context.
- llhttp parses strictly: duplicate or conflicting Content-Length, Content-Length
  beside Transfer-Encoding, obs-fold, malformed chunk sizes or trailers are errors.
  This module adds: a status outside 100..599, 101, an HTTP version other than
  1.0/1.1, a repeated Transfer-Encoding or one other than `chunked`, a content
  coding, more than MAX_HEAD bytes of framing without a body byte (head, chunk
  lines, trailers), a body over its cap (`TooLarge`; a larger Content-Length is
  refused before any body byte is read), and any byte after the end of a response
  (a body longer than its Content-Length, a second response, data on an idle pooled
  connection). Each is a `ProtocolError`, and that connection is closed, never
  pooled again.
- A connection returns to the pool only after its response ended cleanly, both
  sides keep-alive, and nothing arrived since.
- Memory: a whole body is held up to its cap; a stream is read with backpressure
  (the socket pauses once HIGH_WATER bytes wait unread).
- Time: every wait takes a loop-time deadline (or runs under the caller's
  `asyncio.timeout`), never a per-read timeout a dripping peer could renew.

A peer closing the connection mid-answer is a `ConnectionResetError` (an OSError);
the caller maps errors to its own codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class ProtocolError(Exception):
    """The peer's HTTP answer is malformed, too large, or breaks message framing."""


class TooLarge(ProtocolError):
    """The answer's body is over the cap the request was sent with."""


class BindingError(Exception):
    """The peer's TLS key is not the one its pin names."""


MAX_BODY = 64 << 20  # default cap on one response body
MAX_HEAD = 64 << 10  # bytes of framing (status line, headers, chunk lines, trailers) in a row
HIGH_WATER = 256 << 10  # unread body bytes at which the socket stops being read


def spki_sha256(der_cert: bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo of a DER certificate."""
    spki = x509.load_der_x509_certificate(der_cert).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def pin_matches(der_cert: bytes | None, pin: tuple[str, bytes]) -> bool:
    """Whether the peer certificate satisfies `pin`: ("spki", SPKI digest) or (other kind,
    certificate digest), both SHA-256."""
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
            raise ProtocolError("content coding (bodies are taken as received)")
        length = h.get(b"content-length")
        if length is not None and int(length) > self.body_limit:
            raise TooLarge(f"response body over {self.body_limit} bytes")
        self.status = status
        self.head_done = True
        self.keep = parser.should_keep_alive()
        self.eof_body = te is None and length is None and status not in (204, 304)

    def on_body(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.body_limit:
            raise TooLarge(f"response body over {self.body_limit} bytes")
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
        self._end(ConnectionResetError("peer closed the connection mid-answer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionResetError("peer closed the connection mid-answer"))

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
        """Until the protocol wakes this side (data, the end, an error); TimeoutError at the
        loop-time `deadline`. With None no timeout context is entered (one that never fires
        cost every wait about 2 us): the caller's own `asyncio.timeout` is the limit."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if deadline is None:
                await self._waiter
            else:
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
                raise BindingError("peer TLS key differs from the pinned one")
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
