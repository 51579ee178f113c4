"""The gateway's E2EE steps over HTTP: headers, replay (in-process and Redis), sealing of
JSON and SSE, and failing closed on every event that cannot be sealed."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.test_gateway_fakes import (
    API_KEY,
    COMPLETION,
    MARKER,
    FakeProvider,
    run_gateway,
    write_config,
)
from verifier import aci, receipt, sse

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REQ = {"model": "chat-model", "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": MARKER}]}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class ScriptedProvider:
    """A provider whose streamed answer is the exact byte chunks a test sets."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.received: list[bytes] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.received.append(await request.read())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in self.chunks:
            await resp.write(c)
        await resp.write_eof()
        return resp


def sealed_call(gw_pub: bytes, req: dict[str, Any] = REQ, version: str = aci.VERSION,
                kind: str = "chat") -> tuple[bytes, dict[str, str], Any]:
    sealed, headers, opener = aci.seal_request(req, kind, gw_pub, now=time.time(),
                                               version=version)
    return json.dumps(sealed).encode(), {**AUTH, **headers}, opener


def open_stream(raw: bytes, opener: Any, headers: httpx.Headers) -> list[Any]:
    opener.start(headers)
    out: list[Any] = []
    p = sse.SseParser()
    for ev in p.feed(raw):
        out.append(ev.data.decode() if ev.data == b"[DONE]" else
                   opener.open_response(json.loads(ev.data)))
    assert p.rest() == b""
    return out


@pytest.mark.parametrize("version", aci.VERSIONS)
def test_sealed_json_and_stream_round_trip(tmp_path: Path, version: str) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url)) as gw, \
                    httpx.AsyncClient() as c:
                gpub = gw.e2ee_key.public_key().public_bytes_raw()
                body, headers, opener = sealed_call(gpub, version=version)
                assert MARKER.encode() not in body
                r = await c.post(gw.url + "/v1/chat/completions", content=body,
                                 headers=headers)
                assert r.status_code == 200, r.text
                assert MARKER.encode() in prov.received[-1]  # opened for the provider
                assert COMPLETION not in r.text
                opener.start(r.headers)
                assert opener.open_response(r.json())["choices"][0]["message"]["content"] \
                    == COMPLETION
                doc = (await c.get(f"{gw.url}/v1/receipts/{r.headers['x-receipt-id']}",
                                   headers=AUTH)).json()
                salt = bytes.fromhex(r.headers["x-receipt-salt"])
                assert doc["receipt"]["e2ee"] == {"mode": version}
                assert doc["receipt"]["request_hash"] == receipt.digest(salt, body)
                assert doc["receipt"]["response_hash"] == receipt.digest(salt, r.content)

                body, headers, opener = sealed_call(gpub, {**REQ, "stream": True}, version)
                async with c.stream("POST", gw.url + "/v1/chat/completions", content=body,
                                    headers=headers) as s:
                    raw = b"".join([x async for x in s.aiter_raw()])
                assert COMPLETION.encode() not in raw
                events = open_stream(raw, opener, s.headers)
                assert events[-1] == "[DONE]"
                text = "".join(e["choices"][0]["delta"].get("content", "")
                               for e in events[:-1] if e["choices"])
                assert text == COMPLETION + " and more"
        finally:
            await prov.stop()
    run(go())


def test_refusals_before_any_byte_goes_upstream(tmp_path: Path) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url)) as gw, \
                    httpx.AsyncClient() as c:
                url = gw.url + "/v1/chat/completions"
                gpub = gw.e2ee_key.public_key().public_bytes_raw()

                async def code(body: bytes, headers: dict[str, str]) -> tuple[int, str]:
                    r = await c.post(url, content=body, headers=headers)
                    return r.status_code, r.json()["error"]["code"]

                body, headers, _ = sealed_call(gpub)
                assert (await c.post(url, content=body, headers=headers)).status_code == 200
                sent = len(prov.received)
                assert await code(body, headers) == (400, "e2ee_replay_detected")
                stale = aci.seal_request(REQ, "chat", gpub, now=time.time() - 400)
                assert await code(json.dumps(stale[0]).encode(), {**AUTH, **stale[1]}) == \
                    (400, "e2ee_invalid_timestamp")
                other = aci.public_key(secrets.token_bytes(32))
                body, headers, _ = sealed_call(other)
                assert await code(body, headers) == (400, "e2ee_model_key_mismatch")
                body, headers, _ = sealed_call(gpub)
                obj = json.loads(body)
                v = obj["messages"][1]["content"]
                obj["messages"][1]["content"] = v[:-4] + ("AAA=" if v[-4:] != "AAA=" else "AQA=")
                assert await code(json.dumps(obj).encode(), headers) == \
                    (400, "e2ee_decryption_failed")
                # the nonce of a refused request was not consumed: the good body still works
                assert (await c.post(url, content=body, headers=headers)).status_code == 200
                sent += 1
                h = {**headers, "x-e2ee-version": "3"}
                assert await code(body, h) == (400, "e2ee_invalid_version")
                h = {k: v for k, v in headers.items() if k != "x-e2ee-nonce"}
                assert await code(body, h) == (400, "e2ee_header_missing")
                r = await c.get(gw.url + "/v1/models", headers=headers)
                assert (r.status_code, r.json()["error"]["code"]) == \
                    (400, "e2ee_unsupported_endpoint")
                assert len(prov.received) == sent
                prov.fail_status = 422  # a provider error could echo content: withheld
                body, headers, _ = sealed_call(gpub)
                r = await c.post(url, content=body, headers=headers)
                assert (r.status_code, r.json()["error"]["code"]) == (422, "upstream_rejected")
                assert b"boom" not in r.content
        finally:
            await prov.stop()
    run(go())


CHUNK = {"id": "c1", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"content": COMPLETION}, "finish_reason": None}]}


def chunk_json(indent: int | None = None) -> bytes:
    return json.dumps(CHUNK, indent=indent).encode()


async def scripted(tmp_path: Path, chunks: list[bytes], sealed: bool
                   ) -> AsyncIterator[tuple[bytes, httpx.Headers, Any, dict[str, Any]]]:
    prov = ScriptedProvider()
    prov.chunks = chunks
    await prov.start()
    try:
        async with run_gateway(write_config(tmp_path, prov.base_url)) as gw, \
                httpx.AsyncClient() as c:
            gpub = gw.e2ee_key.public_key().public_bytes_raw()
            if sealed:
                body, headers, opener = sealed_call(gpub, {**REQ, "stream": True})
            else:
                body, headers, opener = json.dumps({**REQ, "stream": True}).encode(), AUTH, None
            async with c.stream("POST", gw.url + "/v1/chat/completions", content=body,
                                headers=headers) as s:
                raw = b"".join([x async for x in s.aiter_raw()])
            rc = (await c.get(f"{gw.url}/v1/receipts/{s.headers['x-receipt-id']}",
                              headers=AUTH)).json()["receipt"]
            yield raw, s.headers, opener, rc
    finally:
        await prov.stop()


def collect(tmp_path: Path, chunks: list[bytes], sealed: bool
            ) -> tuple[bytes, httpx.Headers, Any, dict[str, Any]]:
    async def go() -> tuple[bytes, httpx.Headers, Any, dict[str, Any]]:
        async for out in scripted(tmp_path, chunks, sealed):
            return out
        raise AssertionError("no exchange")
    return run(go())


def test_every_sse_framing_is_sealed(tmp_path: Path) -> None:
    """CRLF and CR line ends, multi-line data, comments, ids and a split CRLF: each event's
    content is sealed, none leaks, and the stream opens to the provider's events."""
    pretty = chunk_json(indent=1).replace(b"\n", b"\r\ndata: ")
    chunks = [b": keep-alive\r\n\r\n", b"id: 1\r\ndata: " + chunk_json() + b"\r",
              b"\n\r\n", b"data: " + chunk_json() + b"\r\r",
              b"data: " + pretty + b"\r\n\r\n", b"data: [DONE]\n\n"]
    raw, headers, opener, rc = collect(tmp_path, chunks, sealed=True)
    assert COMPLETION.encode() not in raw and b"keep-alive" not in raw
    events = open_stream(raw, opener, headers)
    assert events == [CHUNK, CHUNK, CHUNK, "[DONE]"]
    assert "refusal" not in rc and rc["e2ee"]["mode"] == "aci-1"
    assert rc["provider_response_hash"] != rc["response_hash"]


@pytest.mark.parametrize("bad", [
    b"event: note\ndata: " + json.dumps({"text": COMPLETION}).encode() + b"\n\n",
    b"data: " + COMPLETION.encode() + b"\n\n",
    b"data: [\"" + COMPLETION.encode() + b"\"]\n\n",
    b"data: " + chunk_json(),  # the stream ends inside an event
], ids=["event-type", "not-json", "not-an-object", "unterminated"])
def test_an_event_that_cannot_be_sealed_ends_the_stream(tmp_path: Path, bad: bytes) -> None:
    chunks = [b"data: " + chunk_json() + b"\n\n", bad, b"data: " + chunk_json() + b"\n\n",
              b"data: [DONE]\n\n"]
    if bad.endswith(b"}"):
        chunks = chunks[:1] + [bad]
    raw, headers, opener, rc = collect(tmp_path, chunks, sealed=True)
    assert COMPLETION.encode() not in raw
    p = sse.SseParser()
    events = p.feed(raw)
    assert p.rest() == b""
    opener.start(headers)
    assert opener.open_response(json.loads(events[0].data)) == CHUNK
    last = json.loads(events[-1].data)
    assert last["error"]["code"] == "e2ee_unsealable" and len(events) == 2
    assert rc["refusal"] == {"code": "e2ee_unsealable", "status": 200}
    assert rc["response_hash"] == receipt.digest(bytes.fromhex(headers["x-receipt-salt"]), raw)


def test_plain_streams_relay_the_exact_bytes(tmp_path: Path) -> None:
    chunks = [b": c\r\n\r\nevent: x\r\ndata: a\r", b"\ndata: b\r\n\r\n",
              b"data: " + chunk_json() + b"\n\n", b"data: [DONE]\n\ntrailing"]
    raw, headers, _, rc = collect(tmp_path, chunks, sealed=False)
    assert raw == b"".join(chunks)
    assert rc["response_hash"] == rc["provider_response_hash"]


def test_redis_replay_cache_is_shared_and_fails_closed(tmp_path: Path) -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping()
    except redis.RedisError:
        pytest.skip("Redis is not running at 127.0.0.1:6379")
    prefix = f"pag:test:{secrets.token_hex(8)}:"

    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            (tmp_path / "down").mkdir()
            shared = f'\n[e2ee]\nredis_url = "redis://127.0.0.1:6379/0"\nprefix = "{prefix}"\n'
            down = '\n[e2ee]\nredis_url = "redis://127.0.0.1:1/0"\n'
            async with run_gateway(write_config(tmp_path / "a", prov.base_url,
                                                extra_gateway=shared)) as a, \
                    run_gateway(write_config(tmp_path / "b", prov.base_url,
                                             extra_gateway=shared)) as b, \
                    run_gateway(write_config(tmp_path / "down", prov.base_url,
                                             extra_gateway=down)) as dead, \
                    httpx.AsyncClient() as c:
                # Two replicas with one E2EE key (as dstack KMS gives every replica).
                key = a.e2ee_key.private_bytes_raw()
                for g in (b, dead):
                    g.app.svc.e2ee_key = key
                    g.app.svc.e2ee_public = aci.public_key(key)
                body, headers, _ = sealed_call(aci.public_key(key))
                r = await c.post(a.url + "/v1/chat/completions", content=body, headers=headers)
                assert r.status_code == 200, r.text
                sent = len(prov.received)
                r = await c.post(b.url + "/v1/chat/completions", content=body, headers=headers)
                assert (r.status_code, r.json()["error"]["code"]) == \
                    (400, "e2ee_replay_detected")
                body, headers, _ = sealed_call(aci.public_key(key))
                r = await c.post(dead.url + "/v1/chat/completions", content=body,
                                 headers=headers)
                assert (r.status_code, r.json()["error"]["code"]) == \
                    (503, "e2ee_replay_unavailable")
                assert len(prov.received) == sent
        finally:
            await prov.stop()
            redis.Redis(host="127.0.0.1", port=6379).delete(
                *redis.Redis(host="127.0.0.1", port=6379).keys(prefix + "*") or [prefix])
    run(go())
