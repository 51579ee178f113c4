"""A hostile provider against the upstream client, then through the gateway.

The provider is a raw asyncio server on loopback that writes exactly the bytes a
test scripts. Promises checked:
- every framing attack (duplicate or conflicting Content-Length, Content-Length
  beside Transfer-Encoding, obs-fold, bad chunk sizes and trailers, a body longer
  than Content-Length, a smuggled second response, bytes on an idle pooled
  connection) is a clean 502 `upstream_bad_response`, and that connection is
  dropped, never reused;
- a provider that hangs, stalls, closes mid-answer, drips bytes or sends a "10 GB"
  body meets a deadline or a cap: bounded time to a clean error or a clean end of
  stream, memory bounded, no connection left open;
- through the gateway, every such call gets a receipt that records what happened.

Timeouts here are scaled down (a second, not thirty); `asyncio.timeout` guards
only keep a broken client from hanging the suite, nothing asserts elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from gateway.api.config import RouteSpec
from gateway.api.errors import GatewayError
from gateway.upstream.client import EventClock, Upstream
from gateway.upstream.leases import LeaseFacts
from tests.test_gateway_fakes import API_KEY, run_gateway, write_config
from tlog.http1 import ProtocolError
from verifier import receipt

GUARD = 20.0  # seconds: a hang guard, never an assertion
RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}  # the gateway serves on uvloop
LEASE = LeaseFacts(True, "lease", "none", "none", None, None)
CAP = 1 << 20  # max_response_bytes in these tests
TEN_GB = 10 << 30
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Script = Callable[[int, Reader, Writer], Awaitable[None]]
Runner = Callable[[Any], Any]


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(text: str) -> bytes:
    return b"data: " + text.encode() + b"\n\n"


@pytest.fixture(params=RUNNERS, ids=RUNNERS)
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's coroutine on the stock asyncio loop and on uvloop (their transports
    differ: uvloop's are not asyncio.Transport subclasses)."""
    return RUNNERS[request.param]


async def read_request(r: Reader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head + await r.readexactly(n)


async def until_closed(r: Reader, w: Writer) -> None:
    """Hold the connection without answering until the client drops it."""
    await r.read()


async def drip(r: Reader, w: Writer, data: bytes, interval: float) -> None:
    """Write `data` one byte at a time, `interval` seconds apart, until the client drops."""
    for i in range(len(data)):
        if w.is_closing() or r.at_eof():
            return
        w.write(data[i:i + 1])
        await w.drain()
        await asyncio.sleep(interval)
    await until_closed(r, w)


async def flood(w: Writer, head: bytes, piece: bytes, total: int, sent: list[int]) -> None:
    """Write `head`, then `piece` repeatedly up to `total` bytes (or until the client drops),
    adding to `sent[0]` what the socket accepted."""
    w.write(head)
    while sent[0] < total and not w.is_closing():
        w.write(piece)
        sent[0] += len(piece)
        await w.drain()


def answer_and_close(data: bytes) -> Script:
    """Write `data`, then close the connection."""
    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(data)
        await w.drain()
        w.close()
    return script


class RawProvider:
    """A provider that writes raw bytes: `script(n, reader, writer)` answers the n-th
    request (counted over all connections). It records each request, how many
    connections it saw and how many are still open."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.conn_of: list[int] = []  # connection number of each request
        self.opened = 0
        self.open = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, r: Reader, w: Writer) -> None:
        number = self.opened
        self.opened += 1
        self.open += 1
        try:
            while True:
                req = await read_request(r)
                self.requests.append(req)
                self.conn_of.append(number)
                await self.script(len(self.requests) - 1, r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            w.close()

    async def all_closed(self) -> None:
        """Wait (guarded) until no connection to this provider is open."""
        async with asyncio.timeout(GUARD):
            while self.open:
                await asyncio.sleep(0.01)


@asynccontextmanager
async def provider(script: Script) -> AsyncIterator[RawProvider]:
    p = RawProvider(script)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def answers(*replies: bytes) -> Script:
    """Answer request n with replies[n] (the last one from then on)."""
    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(replies[min(n, len(replies) - 1)])
        await w.drain()
    return script


def route(p: RawProvider, **kw: Any) -> RouteSpec:
    settings: dict[str, Any] = {"timeout": 1.0, "event_timeout": 0.5, "stream_timeout": 3.0,
                                "max_response_bytes": CAP, "max_sse_line_bytes": 4096}
    settings.update(kw)
    return RouteSpec(id="r", model="m", provider="p", upstream_model="m",
                     base_url=p.base_url, **settings)


async def send(up: Upstream, rt: RouteSpec, stream: bool = False) -> Any:
    async with asyncio.timeout(GUARD):
        return await up.send(rt, LEASE, "/chat/completions", b"{}", stream)


async def refusal(up: Upstream, rt: RouteSpec, stream: bool = False) -> tuple[int, str]:
    with pytest.raises(GatewayError) as e:
        await send(up, rt, stream)
    return e.value.status, e.value.code


async def read_stream(reply: Any) -> tuple[bytes, BaseException | None]:
    """Everything a streamed reply yields, and the error that ended it (None: clean end)."""
    got = b""
    try:
        async with asyncio.timeout(GUARD):
            async for piece in reply.chunks():
                got += piece
    except (TimeoutError, ProtocolError, OSError) as e:
        return got, e
    return got, None


# -- framing attacks: each a clean 502 and a dropped connection ----------------------

FRAMING = {
    "duplicate Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2"
                                b"\r\n\r\n{}",
    "conflicting Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3"
                                  b"\r\n\r\n{}",
    "Content-Length list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n{}",
    "Content-Length beside Transfer-Encoding": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                               b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "Transfer-Encoding beside Content-Length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
                                               b"\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "repeated Transfer-Encoding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "unknown transfer coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                               b"2\r\n{}\r\n0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\n{}",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}",
    "invalid chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n"
                          b"0\r\n\r\n",
    "negative chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n"
                           b"0\r\n\r\n",
    "chunk size overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"1ffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    "chunk without its CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}X"
                              b"0\r\n\r\n",
    "malformed trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
                         b"0\r\nno colon\r\n\r\n",
    "Content-Length in a trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"2\r\n{}\r\n0\r\nContent-Length: 9\r\n\r\n",
    "body longer than Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}EXTRA",
    "smuggled second response": OK + OK,
    "data after Connection: close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                    b"Content-Length: 2\r\n\r\n{}EXTRA",
    "bare LF line ends": b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "status out of range": b"HTTP/1.1 1000 OK\r\nContent-Length: 2\r\n\r\n{}",
    "status below 100": b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\n{}",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                           b"Connection: upgrade\r\n\r\n",
    "not HTTP/1.x": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    "not HTTP at all": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "content coding": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
    "100 MiB header, cut at the head cap": b"HTTP/1.1 200 OK\r\nX: " + b"a" * (1 << 20),
    "huge trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
                    b"X: " + b"a" * (1 << 20),
    "endless interim answers": b"HTTP/1.1 100 Continue\r\n\r\n" * 20000,
    "10 GB Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TEN_GB,
}


@pytest.mark.parametrize("answer", FRAMING.values(), ids=FRAMING.keys())
def test_framing_attack_is_a_clean_502_and_the_connection_is_dropped(answer: bytes,
                                                                      run: Runner) -> None:
    async def go() -> None:
        async with provider(answers(answer, OK)) as p:
            up = Upstream()
            rt = route(p)
            assert await refusal(up, rt) == (502, "upstream_bad_response")
            await p.all_closed()  # the client dropped it (the head answers stop mid-way)
            reply = await send(up, rt)  # the next call works, on a new connection
            assert (reply.status, reply.body) == (200, b"{}")
            assert p.conn_of == [0, 1]
            await up.close()
    run(go())


def test_well_formed_trailers_and_interim_answers_are_accepted(run: Runner) -> None:
    async def go() -> None:
        async with provider(answers(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n1;ext=x\r\n{\r\n1\r\n}\r\n0\r\nX-Checksum: abc\r\n\r\n")) as p:
            up = Upstream()
            for _ in range(2):
                reply = await send(up, route(p))
                assert (reply.status, reply.body) == (200, b"{}")
            assert p.conn_of == [0, 0]  # kept alive and reused
            await up.close()
    run(go())


def test_bytes_on_an_idle_pooled_connection_drop_it_before_reuse(run: Runner) -> None:
    """A provider answers, then sends an unsolicited second response on the idle
    connection (a desync attempt): the pool drops it, and the next request goes over a
    new connection and gets its own answer, not the planted one."""
    planted = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"x\":666}"

    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"n":%d}' % n)
        await w.drain()
        if n == 0:
            await asyncio.sleep(0.05)
            w.write(planted)
            await w.drain()

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            rt = route(p)
            assert (await send(up, rt)).body == b'{"n":0}'
            await p.all_closed()  # the client dropped the connection the bytes came on
            assert (await send(up, rt)).body == b'{"n":1}'
            assert p.conn_of == [0, 1]
            await up.close()
    run(go())


def test_a_connection_whose_answer_broke_is_never_reused(run: Runner) -> None:
    async def go() -> None:
        broken = FRAMING["body longer than Content-Length"]
        async with provider(answers(OK, broken, OK, OK)) as p:
            up = Upstream()
            rt = route(p)
            assert (await send(up, rt)).status == 200
            assert await refusal(up, rt) == (502, "upstream_bad_response")
            assert (await send(up, rt)).status == 200
            assert (await send(up, rt)).status == 200
            assert p.conn_of == [0, 0, 1, 1]  # the broken connection ended with its answer
            await up.close()
    run(go())


# -- slow, silent and endless providers: deadlines and caps --------------------------


def test_provider_that_hangs_before_headers_times_out_and_is_dropped(run: Runner) -> None:
    async def go() -> None:
        async with provider(lambda n, r, w: until_closed(r, w)) as p:
            up = Upstream()
            assert await refusal(up, route(p)) == (504, "upstream_timeout")
            await p.all_closed()
            await up.close()
    run(go())


def test_dripping_body_meets_the_total_deadline_not_a_read_timeout(run: Runner) -> None:
    """One byte every 50 ms: no single read ever waits long, yet the call ends at the
    route deadline."""
    async def script(n: int, r: Reader, w: Writer) -> None:
        await drip(r, w, b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000, 0.05)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            assert await refusal(up, route(p, timeout=0.5)) == (504, "upstream_timeout")
            await p.all_closed()
            await up.close()
    run(go())


def test_provider_closing_mid_body_is_a_clean_502(run: Runner) -> None:
    async def go() -> None:
        async with provider(answer_and_close(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial")) as p:
            up = Upstream()
            assert await refusal(up, route(p)) == (502, "upstream_unreachable")
            await up.close()
    run(go())


def test_ten_gigabyte_chunked_body_is_refused_at_the_cap_with_bounded_memory(run: Runner) -> None:
    sent = [0]

    async def script(n: int, r: Reader, w: Writer) -> None:
        await flood(w, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    chunk(b"x" * (64 << 10)), TEN_GB, sent)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            tracemalloc.start()
            try:
                assert await refusal(up, route(p)) == (502, "upstream_bad_response")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            await p.all_closed()
            assert peak < 8 * CAP  # about the cap, not the body
            assert sent[0] < 64 * CAP  # the socket stopped being read at the cap
            await up.close()
    run(go())


def test_stream_stalled_mid_way_ends_at_the_event_deadline(run: Runner) -> None:
    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(SSE_HEAD + chunk(event("one")) + chunk(b"data: tw"))
        await w.drain()
        await until_closed(r, w)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            reply = await send(up, route(p), stream=True)
            got, err = await read_stream(reply)
            assert got == event("one") + b"data: tw" and isinstance(err, TimeoutError)
            await p.all_closed()
            await up.close()
    run(go())


def test_stream_dripping_one_byte_at_a_time_ends_at_the_event_deadline(run: Runner) -> None:
    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(SSE_HEAD)
        await drip(r, w, chunk(event("x" * 200)), 0.02)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            reply = await send(up, route(p, event_timeout=0.3), stream=True)
            got, err = await read_stream(reply)
            assert isinstance(err, TimeoutError) and len(got) < 200
            await p.all_closed()
            await up.close()
    run(go())


def test_endless_stream_of_timely_events_ends_at_the_stream_deadline(run: Runner) -> None:
    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(SSE_HEAD)
        while not (w.is_closing() or r.at_eof()):
            w.write(chunk(event("tick")))
            await w.drain()
            await asyncio.sleep(0.05)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            reply = await send(up, route(p, event_timeout=0.5, stream_timeout=1.0),
                               stream=True)
            got, err = await read_stream(reply)
            assert isinstance(err, TimeoutError) and got.startswith(event("tick"))
            await p.all_closed()
            await up.close()
    run(go())


def test_slow_but_steady_stream_ends_cleanly_and_its_connection_is_kept(run: Runner) -> None:
    events = [event(f"e{i}") for i in range(5)] + [b"data: [DONE]\r\n\r\n"]

    async def script(n: int, r: Reader, w: Writer) -> None:
        if n:
            w.write(OK)
            return
        w.write(SSE_HEAD)
        for ev in events:
            w.write(chunk(ev[:3]))
            await asyncio.sleep(0.05)
            w.write(chunk(ev[3:]))
            await asyncio.sleep(0.05)
        w.write(b"0\r\n\r\n")
        await w.drain()

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            reply = await send(up, route(p, event_timeout=0.5), stream=True)
            got, err = await read_stream(reply)
            assert (got, err) == (b"".join(events), None)
            assert (await send(up, route(p))).status == 200
            assert p.conn_of == [0, 0]
            await up.close()
    run(go())


def test_ten_gigabyte_stream_breaks_at_the_cap_with_bounded_memory(run: Runner) -> None:
    sent = [0]

    async def script(n: int, r: Reader, w: Writer) -> None:
        await flood(w, SSE_HEAD, chunk(event("y" * 1000) * 60), TEN_GB, sent)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            reply = await send(up, route(p), stream=True)
            tracemalloc.start()
            try:
                seen = 0
                with pytest.raises(ProtocolError):
                    async with asyncio.timeout(GUARD):
                        async for piece in reply.chunks():
                            seen += len(piece)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert seen <= CAP and peak < 8 * CAP and sent[0] < 64 * CAP
            await p.all_closed()
            await up.close()
    run(go())


def test_event_stream_line_over_the_cap_breaks_the_stream(run: Runner) -> None:
    async def script(n: int, r: Reader, w: Writer) -> None:
        w.write(SSE_HEAD + chunk(b"data: " + b"z" * 5000))
        await w.drain()
        await until_closed(r, w)

    async def go() -> None:
        async with provider(script) as p:
            up = Upstream()
            reply = await send(up, route(p), stream=True)
            _, err = await read_stream(reply)
            assert isinstance(err, ProtocolError)
            await p.all_closed()
            await up.close()
    run(go())


@pytest.mark.parametrize(("pieces", "ends"), [
    ([b"data: a\n\n"], [True]),
    ([b"data: a\n", b"\n"], [False, True]),
    ([b"data: a\r", b"\n"], [False, False]),
    ([b"data: a\r", b"\n\r\n"], [False, True]),
    ([b"data: a\r\r"], [True]),
    ([b"data: a\n\r"], [True]),
    ([b"da", b"ta: a", b"\r\n", b"data: b\r\n", b"\r\n"], [False, False, False, False, True]),
    ([b": keep-alive\n\ndata: x"], [True]),
])
def test_event_clock_finds_event_ends_across_chunk_boundaries(pieces: list[bytes],
                                                              ends: list[bool]) -> None:
    clock = EventClock(max_line=100)
    assert [clock.feed(p) for p in pieces] == ends


def test_event_clock_caps_lines_split_across_chunks() -> None:
    clock = EventClock(max_line=10)
    assert clock.feed(b"data: 1234") is False
    with pytest.raises(ProtocolError):
        clock.feed(b"5\n")
    clock = EventClock(max_line=10)
    clock.feed(b"data: 12\n")
    with pytest.raises(ProtocolError):
        clock.feed(b"x" * 11)


# -- through the gateway: every hostile answer gets a receipt ------------------------

ROUTES = """
[[routes]]
id = "r1"
model = "chat-model"
provider = "p1"
base_url = "{url}"
upstream_model = "up"
timeout = 1
event_timeout = 0.5
stream_timeout = 3
max_response_bytes = {cap}
max_sse_line_bytes = 4096
"""

GATEWAY_CASES: dict[str, tuple[bool, Script, int, str]] = {
    # name: (stream, provider script, status, receipt refusal code)
    "hangs before headers": (False, lambda n, r, w: until_closed(r, w), 504,
                             "upstream_timeout"),
    "invalid JSON": (False, answer_and_close(
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{not json"), 502, "upstream_bad_response"),
    "closes mid-body": (False, answer_and_close(
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{"), 502, "upstream_unreachable"),
    "10 GB body": (False, answers(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TEN_GB),
                   502, "upstream_bad_response"),
    "drips one byte at a time": (False, lambda n, r, w: drip(
        r, w, b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n" + b" " * 999, 0.05), 504,
        "upstream_timeout"),
    "duplicate Content-Length": (False, answers(FRAMING["duplicate Content-Length"]), 502,
                                 "upstream_bad_response"),
    "stalls mid-stream": (True, lambda n, r, w: stall_stream(r, w), 200,
                          "upstream_stream_broken"),
    "closes mid-stream": (True, answer_and_close(SSE_HEAD + chunk(event('{"a":1}')) + b"5\r\nda"),
                          200, "upstream_stream_broken"),
    "drips a stream": (True, lambda n, r, w: drip_stream(r, w), 200, "upstream_stream_broken"),
    "streams 10 GB": (True, lambda n, r, w: flood_stream(r, w), 200, "upstream_stream_broken"),
}


async def stall_stream(r: Reader, w: Writer) -> None:
    w.write(SSE_HEAD + chunk(event('{"a":1}')))
    await w.drain()
    await until_closed(r, w)


async def drip_stream(r: Reader, w: Writer) -> None:
    w.write(SSE_HEAD)
    await drip(r, w, chunk(event('{"a":"' + "x" * 100 + '"}')), 0.02)


async def flood_stream(r: Reader, w: Writer) -> None:
    piece = chunk(event('{"a":"' + "y" * 1000 + '"}') * 60)
    w.write(SSE_HEAD)
    for _ in range(TEN_GB // len(piece)):
        if w.is_closing():
            return
        w.write(piece)
        await w.drain()


@pytest.mark.parametrize("case", GATEWAY_CASES.values(), ids=GATEWAY_CASES.keys())
def test_hostile_provider_through_the_gateway_gets_a_receipt_and_no_stuck_connection(
        tmp_path: Path, case: tuple[bool, Script, int, str]) -> None:
    stream, script, status, code = case
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}],
            "stream": stream}

    async def go() -> None:
        async with provider(script) as p:
            cfg = write_config(tmp_path, p.base_url,
                               routes=ROUTES.format(url=p.base_url, cap=CAP))
            async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=GUARD) as c:
                url = gw.url + "/v1/chat/completions"
                async with asyncio.timeout(GUARD), c.stream("POST", url, json=body,
                                                            headers=auth) as r:
                    got = b"".join([x async for x in r.aiter_raw()])
                assert r.status_code == status
                if stream:
                    assert b"[DONE]" not in got  # what came is relayed; the end never came
                else:
                    assert json.loads(got)["error"]["code"] == code
                doc = (await c.get(f"{gw.url}/v1/receipts/{r.headers['x-receipt-id']}",
                                   headers=auth)).json()
                rc = doc["receipt"]
                assert (rc["refusal"]["code"], rc["route"]["route_id"]) == (code, "r1")
                assert rc["response_hash"] == receipt.digest(
                    bytes.fromhex(r.headers["x-receipt-salt"]), got)
                await p.all_closed()
    asyncio.run(go())
