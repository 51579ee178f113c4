"""The few ASGI and command-line pieces the log and the witness servers share.

`read_body` never buffers more than `limit` bytes (a declared Content-Length
over the limit is refused before reading); `respond` always sends
Content-Length.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
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
                  cache: bytes | None = None) -> None:
    """A whole response with Content-Type, Content-Length and optional Cache-Control."""
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    if cache is not None:
        headers.append((b"cache-control", cache))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def listen_address(value: str) -> tuple[str, int]:
    """argparse type for `--listen HOST:PORT` (IPv6 in brackets; empty host = 127.0.0.1)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)
