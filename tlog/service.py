"""Plumbing every HTTP service of the project shares (log, witness, gateway).

The ASGI body reader and responder, the per-request counter, `--listen`
parsing and binding, the server limits, data directory checks, JSON log
lines, seeds from the dstack KMS, private key files, the durable SQLite
opener, the single-writer lock and the package version; nothing here knows
what a log or a witness is.

Invariants: `read_body` never buffers more than `limit` bytes (a declared
Content-Length over the limit is refused before reading); `respond` always
sends Content-Length; `write_private` creates a 0600 file atomically and
fsynced and never replaces one; `connect_durable` commits are fsynced;
`lock_exclusive` succeeds in at most one process at a time per file, and the
lock dies with the process (kill -9 included), so it never needs cleaning up.

Server limits (`ServerLimits`, enforced by `uvicorn_config` for every service):
one unauthenticated client cannot take a service offline. A head must arrive
within `header_timeout` and `max_header_bytes`, a body within `body_timeout`;
idle keep-alive connections close after `keep_alive_timeout`; at
`max_connections` (overall or per client address) a new connection closes the
oldest idle one, so idle or slowloris sockets never lock out a caller, and only
connections busy with a request can fill the caps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import math
import os
import resource
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from tlog.cork import corked

if TYPE_CHECKING:
    from prometheus_client import Counter

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"
METRICS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
"""Content-Type of a Prometheus text-format page (what prometheus_client's
generate_latest writes)."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it exceeds `limit` bytes."""
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks: list[bytes] = []
    total = 0
    while True:
        msg = await receive()
        chunk = msg.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, ctype: bytes = TEXT,
                  cache: bytes | None = None,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A whole response with Content-Type, Content-Length, optional Cache-Control and
    any further `headers`."""
    h = [(b"content-type", ctype), (b"content-length", b"%d" % len(body))]
    if cache is not None:
        h.append((b"cache-control", cache))
    if headers:
        h += headers
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


async def refuse(send: Send, status: int, code: str, reason: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A refusal as every service answers one: JSON `{"error": reason, "code": code}`,
    never cached. `code` is stable (clients branch on it); `reason` is one line for people."""
    body = json.dumps({"error": reason, "code": code}).encode()
    await respond(send, status, body, JSON, b"no-store", headers)


ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Recorder = Callable[[str, int, float], None]
"""record(path, status, seconds) for one answered HTTP request."""


class RequestCounter:
    """A `Recorder` that counts each answered request in a prometheus counter labelled
    (route, status), `route` mapping a path to one of a small fixed set of labels.

    Each (route, status) child is looked up once and kept: the counter's `labels` takes
    its lock and checks its values on every call (about 2.8 us a request, against 0.8
    for the child's own `inc`, measured in a tight loop)."""

    def __init__(self, counter: Counter, route: Callable[[str], str]) -> None:
        self._counter = counter
        self._route = route
        self._children: dict[tuple[str, int], Counter] = {}

    def __call__(self, path: str, status: int, seconds: float) -> None:
        key = (self._route(path), status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(key[0], str(status))
        child.inc()


def observed(app: ASGIApp, record: Recorder) -> ASGIApp:
    """`app` with every HTTP request reported to `record` once answered (status 500 if the
    app raised before answering). Other scope types pass through untouched."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_observed(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await app(scope, receive, send_observed)
        finally:
            record(scope["path"], status, time.perf_counter() - started)

    return wrapped


class Probe:
    """A blocking readiness check run in a thread, at most one in flight (a hung dependency
    cannot pile up threads). `await probe()` is "ok" or a one-line reason."""

    def __init__(self, check: Callable[[], object], timeout: float) -> None:
        self._check = check
        self._timeout = timeout
        self._running: asyncio.Future[object] | None = None

    async def __call__(self) -> str:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(asyncio.to_thread(self._check))
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._running), self._timeout)
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as e:  # noqa: BLE001 - whatever the dependency raises: not ready
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        return "ok"


# -- what one client may hold of a server --------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    """The bounds every service puts on what an unauthenticated client can hold.

    - `header_timeout`: seconds from a connection's opening, or from the first
      byte of a later request on it, to the end of that request's head (else 408,
      closed): a silent or slowloris client frees its slot.
    - `body_timeout`: seconds from the end of a head to the end of its body (else
      closed; the application sees a disconnect).
    - `keep_alive_timeout`: seconds an idle keep-alive connection is kept.
    - `max_connections`: open connections. At the cap a new connection closes the
      oldest idle one (no request in progress: waiting, or still sending its head);
      when none is idle it is answered 503 and closed. Lowered at start if the
      process may not open about twice as many files.
    - `max_connections_per_client`: the same, per client IP address (0: no such
      cap; behind a proxy every client has the proxy's address).
    - `max_header_bytes`: request line and headers (else 431, closed), which also
      bounds the parser's work on one head.
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 2048
    max_connections_per_client: int = 256
    max_header_bytes: int = 32768

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout",
                     "max_connections", "max_header_bytes"):
            if not math.isfinite(getattr(self, name)):  # a flag or TOML of nan or inf
                raise ValueError(f"{name} must be a finite number")
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections_per_client < 0:
            raise ValueError("max_connections_per_client must not be negative")


LIMIT_FLAGS = {"header_timeout": float, "body_timeout": float, "keep_alive_timeout": float,
               "max_connections": int, "max_connections_per_client": int,
               "max_header_bytes": int}


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds. nan, inf, zero and negatives
    are a usage error naming the flag (exit 2), never a loop that spins or a crash later."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"not a positive, finite number of seconds: {text!r}")
    return value


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """`--header-timeout`, `--body-timeout`, `--keep-alive-timeout`, `--max-connections`,
    `--max-connections-per-client`, `--max-header-bytes` (ServerLimits' defaults)."""
    for name, kind in LIMIT_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind,
                            default=getattr(ServerLimits, name), metavar="N",
                            help=f"server limit (default {getattr(ServerLimits, name)}; "
                                 "docs/config.md)")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The ServerLimits of parsed `add_limit_arguments` flags (ValueError naming the flag)."""
    try:
        return ServerLimits(**{name: getattr(args, name) for name in LIMIT_FLAGS})
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


FILES_IN_RESERVE = 256  # descriptors kept for storage, logs and outgoing connections


def connection_cap(limits: ServerLimits) -> int:
    """`max_connections`, after raising the open-files limit toward twice that (a call may
    hold one outgoing connection per incoming one); lowered, with a warning, when the
    hard limit does not allow it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * limits.max_connections + FILES_IN_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    cap = max(1, min(limits.max_connections, (soft - FILES_IN_RESERVE) // 2))
    if cap < limits.max_connections:
        logging.getLogger("tlog.service").warning(
            "max_connections lowered to %d: the process may open only %d files", cap, soft)
    return cap


class ConnectionBook:
    """Open connections, oldest first, overall and per client address; decides which
    connection makes room for a new one. Bookkeeping only: the caller closes."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._all: dict[Any, str] = {}
        self._by_client: dict[str, dict[Any, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def admit(self, conn: Any, client: str, idle: Callable[[Any], bool]
              ) -> tuple[bool, list[Any]]:
        """(admitted, connections to close to make room): the oldest idle connection of
        the same client at the per-client cap, the oldest idle one at the total cap. Those
        are forgotten at once; a connection that cannot get room is not admitted."""
        victims: list[Any] = []
        mine = self._by_client.get(client, {})
        if self.per_client and len(mine) >= self.per_client:
            victim = next((c for c in mine if idle(c)), None)
            if victim is None:
                return False, []
            victims.append(victim)
            self.forget(victim)
        if len(self._all) >= self.total:
            victim = next((c for c in self._all if idle(c)), None)
            if victim is None:
                return False, victims
            victims.append(victim)
            self.forget(victim)
        self._all[conn] = client
        self._by_client.setdefault(client, {})[conn] = None
        return True, victims

    def forget(self, conn: Any) -> None:
        """Drop a closed (or closing) connection; no-op if unknown."""
        client = self._all.pop(conn, None)
        if client is not None:
            mine = self._by_client[client]
            del mine[conn]
            if not mine:
                del self._by_client[client]


REFUSALS = {status: (f"HTTP/1.1 {status} {reason}\r\nconnection: close\r\n"
                     "content-length: 0\r\n\r\n").encode()
            for status, reason in ((408, "Request Timeout"), (431, "Request Header Fields Too "
                                   "Large"), (503, "Service Unavailable"))}


MALFORMED = orjson.dumps({"error": "malformed HTTP request", "code": "malformed_http"})
"""The 400 body of a request httptools cannot parse (the log's and the witness's refusal
shape; the gateway passes its OpenAI-shaped one)."""


def bounded_http(limits: ServerLimits, cap: int, malformed: bytes = MALFORMED
                 ) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class with `limits` enforced (`cap` connections), one
    `ConnectionBook` per class: build one per server. A request that cannot be parsed is
    answered 400 with the JSON `malformed` body (uvicorn's own answer is plain text), and
    the connection closed."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    book = ConnectionBook(cap, limits.max_connections_per_client)

    def idle(p: Any) -> bool:  # no request in progress (waiting, or sending its head)
        return (p.cycle is None or p.cycle.response_complete) and not p.pipeline

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """One timer per connection (the head deadline, then the body deadline) and a count
        of head bytes; a book of connections for the caps."""

        _deadline: asyncio.TimerHandle | None = None
        _in_head = False
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            admitted, victims = book.admit(self, self.client[0] if self.client else "",
                                           idle)
            for v in victims:
                v.transport.close()
            if not admitted:
                self._refuse(503)
                return
            self._arm(limits.header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            book.forget(self)
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                # every byte fed while a head is open counts (a pipelined burst may
                # overcount by the tail of the previous body: never undercount)
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    self._refuse(431)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            if self._deadline is None:  # a fresh connection's deadline runs from its opening
                self._arm(limits.header_timeout)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._arm(limits.body_timeout)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self._in_head or self.cycle is None:
                self._refuse(408)
            else:  # a body that did not come in time: the application sees a disconnect
                self.transport.close()

        def send_400_response(self, msg: str) -> None:  # noqa: ARG002 - uvicorn's text
            self._disarm()
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            head += [n + b": " + v + b"\r\n" for n, v in self.server_state.default_headers]
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                        b"connection: close\r\n\r\n" % len(malformed))
            self.transport.write(b"".join(head) + malformed)
            self.transport.close()

        def _refuse(self, status: int) -> None:
            self._disarm()
            if not self.transport.is_closing():
                if idle(self):
                    self.transport.write(REFUSALS[status])
                self.transport.close()

    return BoundedHttpToolsProtocol


def uvicorn_config(app: Any, limits: ServerLimits, malformed: bytes = MALFORMED,
                   **kwargs: Any) -> Any:
    """A `uvicorn.Config` serving `app` on httptools with `limits` enforced, unparseable
    requests answered 400 with `malformed`, and its connections corked (tlog/cork.py: a
    whole answer's head and body in one write);
    `kwargs` go to uvicorn (host, port, log_level, ...). No service reads the client's
    address from X-Forwarded-* headers or names its server software, so both are off
    unless `kwargs` turn them on (uvicorn's proxy-header middleware was ~5 % of the log's
    CPU under `POST /add`)."""
    import uvicorn

    kwargs.setdefault("proxy_headers", False)
    kwargs.setdefault("server_header", False)
    return uvicorn.Config(app, http=corked(bounded_http(limits, connection_cap(limits),
                                                        malformed)),
                          timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]
                          **kwargs)


def _type_name(o: object) -> str:
    return type(o).__name__


# dataclasses and datetimes, which orjson would encode, go to `_type_name` as json.dumps
# sends them; str, int, dict and list subclasses are encoded by value by both (enums and
# UUIDs too, by orjson only)
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: `time` (RFC 3339 UTC, ms), `level`, `logger`, `msg`,
    plus the members of `extra={"fields": {...}}`. An exception is logged as `exc_type`
    and `stack` (its frames), never its message, which a parser may have filled with
    input; a field that is not JSON-serialisable is logged as its type name.

    Lines are ASCII: other characters are escaped, as by json.dumps. orjson writes the
    common line; a line it refuses (an integer past 64 bits, a non-string key) or would
    write with non-ASCII characters is written by json.dumps instead."""

    _second: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info if record.exc_info and record.exc_info[0] is not None else None
        fields = getattr(record, "fields", None)
        return self.line(record.created, record.levelname.lower(), record.name,
                         record.getMessage(), fields if isinstance(fields, dict) else None, exc)

    def line(self, t: float, level: str, logger: str, msg: str,
             fields: dict[str, Any] | None = None, exc: Any = None) -> str:
        """The line of a record made at `t` (Unix seconds) with these members (`exc`: an
        `exc_info` triple); `format` is this applied to a record."""
        second = int(t)
        cached = self._second  # one tuple, so threads never pair a second with another's text
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.gmtime(second)))
        doc: dict[str, Any] = {"time": f"{cached[1]}.{int((t - second) * 1000):03d}Z",
                               "level": level, "logger": logger, "msg": msg}
        if fields:
            doc.update(fields)
        if exc is not None:
            doc["exc_type"] = exc[0].__name__
            doc["stack"] = "".join(traceback.format_tb(exc[2]))
        try:
            line = orjson.dumps(doc, default=_type_name, option=_ORJSON_OPTIONS).decode()
            if line.isascii():
                return line
        except orjson.JSONEncodeError:
            pass
        return json.dumps(doc, separators=(",", ":"), default=_type_name)


class JsonLines(logging.StreamHandler):  # type: ignore[type-arg]
    """`JsonFormatter` lines to a stream, the lines of one event loop turn in one write.

    A line written on a thread running an event loop is held until the end of that loop
    turn (`loop.call_soon`), and leaves with the others of the turn; with no loop running
    in the writing thread it leaves at once, after anything held. (At 16 clients the
    gateway wrote one line per call, one system call each.)

    Invariants: lines leave whole, in the order written; none is held past the loop turn
    it was written in, nor past `flush` or `close` (which logging runs at exit).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.formatter: JsonFormatter = JsonFormatter()
        self._held: list[str] = []
        self._due: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        if not isinstance(fmt, JsonFormatter):
            raise TypeError("JsonLines writes JsonFormatter lines only")
        super().setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own rule: a failed line never fails the caller
            self.handleError(record)

    def write(self, line: str) -> None:
        """Write one formatted line (as `emit` does once it is formatted)."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._held.append(line)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: now, after what is held
                self.flush()
                return
            if self._due is not loop:  # (a loop that stopped before its flush ran: this one)
                self._due = loop
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is held, in one write. A stream that fails loses those lines and
        raises nothing (as a logging handler never fails its caller)."""
        with self.lock:  # type: ignore[union-attr]
            held, self._held, self._due = self._held, [], None
            try:
                if held:
                    self.stream.write("\n".join(held) + "\n")
                if self.stream and hasattr(self.stream, "flush"):
                    self.stream.flush()
            except Exception:  # noqa: BLE001, S110 - nowhere left to report it
                pass

    def close(self) -> None:
        """Write what is held, then close as any handler does."""
        self.flush()
        super().close()

    @staticmethod
    def sole(logger: logging.Logger, level: int) -> JsonLines | None:
        """The JsonLines handler that alone gets `logger`'s records at `level` (the
        handlers `Logger.callHandlers` would reach), with no filter on the way: a line
        written to it directly is the line logging would write. Else None."""
        if logger.disabled or logger.filters or not logger.isEnabledFor(level):
            return None
        handlers: list[logging.Handler] = []
        node: logging.Logger | None = logger
        while node is not None:
            handlers += node.handlers
            node = node.parent if node.propagate else None
        if len(handlers) != 1:
            return None
        h = handlers[0]
        if type(h) is not JsonLines or h.filters or level < h.level:
            return None
        return h


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Let glibc's malloc keep at most `arenas` arenas for the process's threads (its default
    is eight per core); whether it took it (False where the C library is not glibc). Call it
    before any thread starts. Each thread that allocates otherwise gets an arena of its own,
    and memory freed in one stays resident there: `tlog serve`'s peak RSS after the bench's
    appends was 193-212 MiB at 1M entries and 190-196 at 10M with the default, 175 and 167
    with two arenas, at the same speed (docs/benchmarks-history.md)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def log_json(level: int = logging.INFO) -> None:
    """Send every log record of this process to stderr as JSON lines (`JsonLines`);
    HTTP client libraries' per-request lines are left out. Records skip what the lines
    never show (the caller's file and line, thread and process names), which halves the
    cost of a call's line."""
    handler = JsonLines(sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    logging._srcfile = None  # type: ignore[attr-defined]  # (the logging HOWTO's "Optimization")
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


async def dstack_seed(endpoint: str, path: str) -> bytes:
    """A 32-byte Ed25519 seed derived from the dstack KMS key at `path`, through the guest
    agent at `endpoint` (the same app and path always give the same seed)."""
    from dstack_sdk import AsyncDstackClient

    key = await AsyncDstackClient(endpoint=endpoint).get_key(path)
    return hashlib.sha256(b"pag-note-key\x00" + key.decode_key()).digest()


class StopSignal:
    """SIGTERM/SIGINT as a flag. uvicorn handles them while it serves, then re-raises the
    signal to whatever handler was there before; this one absorbs it, so the service's own
    clean-up (closing its store) runs and the exit status is 0. A signal that came before
    uvicorn served is `received`: the caller then does not start serving."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True


def listen_address(value: str) -> tuple[str, int]:
    """argparse type for `--listen HOST:PORT` (IPv6 hosts in brackets; port 0..65535)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening, for uvicorn's `run(sockets=...)`.

    Raises OSError whose `str` is one line naming the address and the reason
    (address already in use, cannot assign the address, unknown host, ...).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle adds 40 ms)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") \
            from None
    return sock


def check_data_dir(path: Path) -> None:
    """Create `path` if missing; ValueError (one line) unless it is a directory this process
    can create files in (tried, not guessed from mode bits: root ignores them)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"data directory {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create data directory {path}: "
                         f"{(e.strerror or str(e)).lower()}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"data directory {path} is not writable: "
                         f"{(e.strerror or str(e)).lower()}") from None


def package_version() -> str:
    """The installed project's version (for `--version`)."""
    try:
        return metadata.version("private-ai-gateway")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def write_private(path: Path, data: str) -> None:
    """Create `path` with mode 0600 (atomically, fsynced); never overwrite."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, path)  # fails if path exists: a key is never replaced
    os.unlink(tmp)


def write_public(path: Path, data: str) -> None:
    """Write a public file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def connect_durable(path: str | Path, schema: str) -> sqlite3.Connection:
    """An autocommit connection (explicit transactions) in WAL mode whose commits are
    fsynced (synchronous=FULL), with `schema` applied."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


class LockHeld(RuntimeError):
    """Another process holds an exclusive lock this one needs."""


def lock_exclusive(path: Path) -> int:
    """Take an exclusive lock on `path` (created 0600 if missing) without waiting.

    Returns the open file descriptor: the lock lasts until it is closed or the
    process ends. Raises LockHeld if another open file holds the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(f"{path} is locked by another process") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
