"""Plumbing every HTTP service of the project shares (log, witness, gateway).

The ASGI body reader and responder, `--listen` parsing, private key files and
the durable SQLite opener; nothing here knows what a log or a witness is.

Invariants: `read_body` never buffers more than `limit` bytes (a declared
Content-Length over the limit is refused before reading); `respond` always
sends Content-Length; `write_private` creates a 0600 file atomically and
fsynced and never replaces one; `connect_durable` commits are fsynced.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TEXT = b"text/plain; charset=utf-8"


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


def listen_address(value: str) -> tuple[str, int]:
    """argparse type for `--listen HOST:PORT` (IPv6 hosts in brackets; port 0..65535)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


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
