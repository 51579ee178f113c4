"""The lean HTTP/1.1 client under the gateway and the shipper, against canned raw answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.upstream.leases import facts_of, rfc3339
from tlog.http1 import Pool, ProtocolError, exchange

REQ = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head + await r.readexactly(n)


def canned(*answers: bytes, close: bool = False) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for a in answers:
            await read_request(r)
            w.write(a)
            await w.drain()
        if close:
            w.close()
    return handler


def test_content_length_chunked_and_keepalive() -> None:
    async def go() -> None:
        srv, port = await serve(canned(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: a/b\r\n\r\nhello",
            b"HTTP/1.1 201 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"))
        pool = Pool()
        target = ("127.0.0.1", port, False, None)
        conn, status, headers = await exchange(pool, target, REQ)
        assert (status, headers[b"content-type"], await conn.body()) == (200, b"a/b", b"hello")
        pool.release(conn)
        conn2, status, _ = await exchange(pool, target, REQ)
        assert conn2 is conn  # reused
        assert (status, [c async for c in conn2.stream()]) == (201, [b"abc", b"de"])
        pool.release(conn2)
        pool.close()
        srv.close()
    asyncio.run(go())


def test_eof_delimited_body_is_not_reused() -> None:
    async def go() -> None:
        srv, port = await serve(canned(b"HTTP/1.0 200 OK\r\n\r\nall of it", close=True))
        pool = Pool()
        conn, _, _ = await exchange(pool, ("127.0.0.1", port, False, None), REQ)
        assert await conn.body() == b"all of it"
        assert not conn.keep
        pool.release(conn)
        pool.close()
        srv.close()
    asyncio.run(go())


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async def go() -> None:
        served = []

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            served.append(await read_request(r))
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()
            w.close()  # closes after one answer although it said keep-alive

        srv, port = await serve(handler)
        pool = Pool()
        target = ("127.0.0.1", port, False, None)
        for _ in range(3):
            conn, status, _ = await exchange(pool, target, REQ)
            assert (status, await conn.body()) == (200, b"ok")
            pool.release(conn)
            await asyncio.sleep(0.05)
        assert len(served) == 3
        pool.close()
        srv.close()
    asyncio.run(go())


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_answers_raise_protocol_error(answer: bytes) -> None:
    async def go() -> None:
        srv, port = await serve(canned(answer, close=True))
        pool = Pool()
        with pytest.raises(ProtocolError):
            conn, _, _ = await exchange(pool, ("127.0.0.1", port, False, None), REQ)
            await conn.body()
        pool.close()
        srv.close()
    asyncio.run(go())


def test_facts_and_times() -> None:
    class L:
        lease_id = "x"
        verified = True
        evidence = "dstack"
        binding = "tls-spki:" + "ab" * 32
        verified_at = 0.0
        expires_at = "2030-01-01T00:00:00Z"

    f = facts_of(L())
    assert f.pin == ("spki", bytes.fromhex("ab" * 32))
    assert f.binding == "tls-spki:" + "ab" * 32
    assert f.receipt()["verified_at"] == "1970-01-01T00:00:00Z"
    assert f.receipt()["expires_at"] == "2030-01-01T00:00:00Z"
    assert rfc3339(None) is None


def test_route_credential_is_sent_to_the_provider_and_only_there() -> None:
    from gateway.api.config import RouteSpec
    from gateway.upstream.client import Upstream
    from gateway.upstream.leases import LeaseFacts

    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while not r.at_eof():
            try:
                seen.append(await read_request(r))
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await w.drain()

    async def go() -> None:
        srv, port = await serve(handler)
        up = Upstream()
        lease = LeaseFacts(True, "x", "none", "l", None, None)
        for rid, key in (("with", "sk-123"), ("without", "")):
            route = RouteSpec(id=rid, model="m", provider="p", upstream_model="m",
                              base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
            reply = await up.send(route, lease, "/chat/completions", b"{}", False)
            assert reply.status == 200
        await up.close()
        srv.close()

    asyncio.run(go())
    assert b"\r\nAuthorization: Bearer sk-123\r\n" in seen[0]
    assert b"authorization" not in seen[1].lower()
