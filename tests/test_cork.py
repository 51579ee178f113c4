"""Corked connections (tlog/cork.py): one write per loop turn, same bytes, same order."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from tlog.cork import CorkedTransport, corked
from tlog.service import ServerLimits, bounded_http, uvicorn_config


class Recording(asyncio.Transport):
    """A transport that records what reaches it: each write, and close/abort."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_head_leaves_joined_with_the_next_write_and_other_writes_at_once() -> None:
    async def run() -> list[bytes]:
        inner = Recording()
        t = CorkedTransport(inner, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")
        assert inner.writes == [] and t.get_write_buffer_size() == 19
        t.writelines([bytearray(b"body"), memoryview(b"!")])
        assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"!"]
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # nothing follows it in this turn
        assert len(inner.writes) == 2
        await asyncio.sleep(0)
        return inner.writes

    assert asyncio.run(run())[2:] == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_a_streams_events_are_not_held_while_the_writer_keeps_the_loop() -> None:
    """The gateway relays buffered upstream chunks without yielding: each leaves at once."""
    async def run() -> list[bytes]:
        inner = Recording()
        t = CorkedTransport(inner, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            t.write(b"9\r\ndata: %d\n\n\r\n" % i)
        writes = list(inner.writes)
        await asyncio.sleep(0)
        assert inner.writes == writes
        return writes

    writes = asyncio.run(run())
    assert len(writes) == 3 and writes[0].endswith(b"data: 0\n\n\r\n")
    assert writes[1:] == [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n"]


def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    async def run() -> tuple[Recording, Recording]:
        loop = asyncio.get_running_loop()
        closed, aborted = Recording(), Recording()
        a, b = CorkedTransport(closed, loop), CorkedTransport(aborted, loop)
        a.write(b"HTTP/1.1 200 OK\r\n\r\n")  # held: a head
        a.close()
        b.write(b"HTTP/1.1 500 Oops\r\n\r\n")
        b.abort()
        await asyncio.sleep(0)
        a.write(b"after close")  # dropped, as a closed transport drops it
        await asyncio.sleep(0)
        return closed, aborted

    closed, aborted = asyncio.run(run())
    assert closed.events == ["write", "close"] and closed.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert aborted.events == ["abort"] and aborted.writes == []


async def _serve(protocol: type[asyncio.Protocol], app: Any) -> tuple[uvicorn.Server, int,
                                                                     asyncio.Task[None]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=protocol, log_config=None, log_level="warning",
                            lifespan="off", server_header=False, date_header=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, sock.getsockname()[1], task


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A whole answer to /whole, a chunked stream of three events to /stream."""
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/whole":
        body = b'{"answer": "%s"}' % scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(3):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                    "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _exchange(port: int, request: bytes, until: bytes, times: int = 1) -> bytes:
    """What the server sent on one connection until `until` came `times` times."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    out = b""
    while out.count(until) < times:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, out
        out += chunk
    writer.close()
    return out


def test_a_corked_server_sends_the_same_bytes_for_pipelined_and_streamed_answers() -> None:
    pipelined = (b"POST /whole HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                 b"POST /whole HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    stream = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"

    async def run(protocol: type[asyncio.Protocol]) -> tuple[bytes, bytes]:
        server, port, task = await _serve(protocol, _app)
        try:
            return (await _exchange(port, pipelined, b'{"answer": "/whole"}', 2),
                    await _exchange(port, stream, b"0\r\n\r\n"))
        finally:
            server.should_exit = True
            await task

    plain = bounded_http(ServerLimits(), 100)
    assert asyncio.run(run(corked(bounded_http(ServerLimits(), 100)))) == asyncio.run(run(plain))


def test_every_service_answers_a_request_in_one_write() -> None:
    """The protocol `uvicorn_config` gives the tlog, the witness and the gateway sends a whole
    answer's head and body in one write; uncorked, the same answer takes two."""

    async def run(protocol: type[asyncio.Protocol], config: uvicorn.Config) -> list[bytes]:
        inner = Recording()
        inner.get_extra_info = lambda name, default=None: (  # type: ignore[method-assign]
            ("127.0.0.1", 4000) if name in ("peername", "sockname") else default)
        proto: Any = protocol(config=config, server_state=ServerState(),  # type: ignore[call-arg]
                              app_state={})
        proto.connection_made(inner)
        proto.data_received(b"POST /whole HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        for _ in range(20):
            await asyncio.sleep(0)
        proto.connection_lost(None)
        return inner.writes

    config = uvicorn_config(_app, ServerLimits(), lifespan="off", log_config=None,
                            log_level="warning", date_header=False)
    config.load()
    writes = asyncio.run(run(config.http_protocol_class, config))
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nserver:" not in writes[0].lower()
    assert writes[0].endswith(b'\r\n\r\n{"answer": "/whole"}')
    assert len(asyncio.run(run(bounded_http(ServerLimits(), 100), config))) == 2


def test_services_take_no_client_address_from_forwarded_headers() -> None:
    """No service reads X-Forwarded-For (a peer could claim any address with it) or names
    its server software; a caller may still turn either on."""
    config = uvicorn_config(_app, ServerLimits(), lifespan="off", log_config=None)
    config.load()
    assert config.loaded_app is _app  # no ProxyHeadersMiddleware in front of it
    assert not config.server_header
    config = uvicorn_config(_app, ServerLimits(), lifespan="off", log_config=None,
                            proxy_headers=True)
    config.load()
    assert config.loaded_app is not _app
