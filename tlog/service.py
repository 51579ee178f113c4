"""Plumbing every HTTP service of the project shares (log, witness, gateway).

The ASGI body reader and responder, `--listen` parsing and binding, data
directory checks, private key files, the durable SQLite opener, the
single-writer lock and the package version; nothing here knows what a log or
a witness is.

Invariants: `read_body` never buffers more than `limit` bytes (a declared
Content-Length over the limit is refused before reading); `respond` always
sends Content-Length; `write_private` creates a 0600 file atomically and
fsynced and never replaces one; `connect_durable` commits are fsynced;
`lock_exclusive` succeeds in at most one process at a time per file, and the
lock dies with the process (kill -9 included), so it never needs cleaning up.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import socket
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TEXT = b"text/plain; charset=utf-8"
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


ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Recorder = Callable[[str, int, float], None]
"""record(path, status, seconds) for one answered HTTP request."""


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
        sock = socket.socket(family, socket.SOCK_STREAM)
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
