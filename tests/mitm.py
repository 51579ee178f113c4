"""Test doubles on the wire between a client and the gateway: a TCP relay that records
every byte (what anyone on the path sees), and an HTTP man in the middle that records,
rewrites and replays exchanges (an attacker holding the TLS terminator, or any hop of
plain HTTP). Both run in their own thread, so blocking clients can use them.

This module holds no tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class Loop:
    """An event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class TcpRecorder:
    """Relays TCP to `(host, port)`, keeping every byte of both directions."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.data = bytearray()
        self.connections = 0
        self._loop = Loop()
        self._server: asyncio.Server = self._loop.run(asyncio.start_server(
            self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_r, up_w = await asyncio.open_connection(*self.target)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while chunk := await r.read(65536):
                    self.data += chunk
                    w.write(chunk)
                    await w.drain()
            with contextlib.suppress(OSError):
                w.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    def close(self) -> None:
        self._server.close()
        self._loop.stop()


@dataclass
class Exchange:
    """One request and answer as they crossed the man in the middle."""

    method: str
    path: str
    request_headers: dict[str, str]
    request_body: bytes
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""


RequestHook = Callable[[Exchange], None]
ResponseHook = Callable[[Exchange], None]


class Mitm:
    """An HTTP(S) reverse proxy to `upstream` whose hooks may rewrite what passes.

    `on_request(exchange)` may change the request headers and body before they are
    forwarded; `on_response(exchange)` the status, headers and body (whole bodies:
    streams are buffered) before they are returned. Every exchange is kept."""

    def __init__(self, upstream: str, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.exchanges: list[Exchange] = []
        self.on_request: RequestHook | None = None
        self.on_response: ResponseHook | None = None
        self._loop = Loop()
        self._runner, self.port = self._loop.run(self._start(tls))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    async def _start(self, tls: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def forward(self, ex: Exchange) -> Exchange:
        """Send an exchange's request upstream (used for replays too)."""
        headers = {k: v for k, v in ex.request_headers.items() if k.lower() not in HOP}
        async with aiohttp.ClientSession(auto_decompress=False) as s, s.request(
                ex.method, self.upstream + ex.path, headers=headers,
                data=ex.request_body) as r:
            ex.status = r.status
            ex.response_headers = {k.lower(): v for k, v in r.headers.items()}
            ex.response_body = await r.read()
        return ex

    async def _proxy(self, request: web.Request) -> web.Response:
        ex = Exchange(request.method, request.path_qs,
                      {k.lower(): v for k, v in request.headers.items()}, await request.read())
        if self.on_request is not None:
            self.on_request(ex)
        self.exchanges.append(ex)
        await self.forward(ex)
        if self.on_response is not None:
            self.on_response(ex)
        headers = {k: v for k, v in ex.response_headers.items() if k not in HOP}
        return web.Response(status=ex.status, headers=headers, body=ex.response_body)

    def replay(self, ex: Exchange) -> Exchange:
        """Send a recorded request again, unchanged."""
        return self._loop.run(self.forward(Exchange(ex.method, ex.path,
                                                    dict(ex.request_headers),
                                                    ex.request_body)))

    def close(self) -> None:
        self._loop.run(self._runner.cleanup())
        self._loop.stop()
