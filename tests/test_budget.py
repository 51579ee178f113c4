"""Every call is charged, and budgets hold under concurrency: streams are asked for their
usage (stripped from what a client that did not ask receives), and a call reserves the most
it could use before anything is forwarded, settling with the real usage afterwards."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.config import ApiKey
from gateway.api.errors import GatewayError
from gateway.api.pipeline import Request, reserve_tokens
from gateway.api.ratelimit import Limiter
from tests.test_gateway_fakes import API_KEY, FakeProvider, run_gateway, write_config
from verifier import receipt

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def chat(stream: bool = False, usage: bool | None = None, **extra: Any) -> bytes:
    obj: dict[str, Any] = {"model": "chat-model", "stream": stream,
                           "messages": [{"role": "user", "content": "hi"}], **extra}
    if usage is not None:
        obj["stream_options"] = {"include_usage": usage}
    return json.dumps(obj).encode()


def key_used(gw: Any) -> int:
    svc = gw.app.svc
    return svc.limiter.used(svc.keys.lookup(b"Bearer " + API_KEY.encode()))


async def _stream(c: httpx.AsyncClient, url: str, body: bytes) -> tuple[httpx.Response, bytes]:
    async with c.stream("POST", url + "/v1/chat/completions", content=body, headers=AUTH) as r:
        return r, b"".join([x async for x in r.aiter_raw()])


async def _receipt(c: httpx.AsyncClient, url: str, r: httpx.Response) -> dict[str, Any]:
    got = await c.get(f"{url}/v1/receipts/{r.headers['x-receipt-id']}", headers=AUTH)
    return got.json()["receipt"]


def test_a_stream_that_did_not_ask_for_usage_is_charged_and_sees_none(tmp_path: Path) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, budget=100_000)
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                for n in range(1, 6):
                    r, got = await _stream(c, gw.url, chat(stream=True, max_tokens=3))
                    assert r.status_code == 200
                    assert b'"usage"' not in got and got.endswith(b"data: [DONE]\n\n")
                    assert json.loads(prov.received[-1])["stream_options"] == {
                        "include_usage": True}
                    assert b'"usage"' in prov.sent[-1]
                    rc = await _receipt(c, gw.url, r)
                    salt = bytes.fromhex(r.headers["x-receipt-salt"])
                    assert rc["usage"]["total_tokens"] == 8
                    assert rc["response_hash"] == receipt.digest(salt, got)
                    assert rc["provider_response_hash"] == receipt.digest(salt, prov.sent[-1])
                    assert rc["forwarded_hash"] == receipt.digest(salt, prov.received[-1])
                    assert key_used(gw) == 8 * n
        finally:
            await prov.stop()
    asyncio.run(go())


def test_a_stream_that_asked_for_usage_gets_it_unchanged(tmp_path: Path) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url, budget=100_000)) as gw, \
                    httpx.AsyncClient() as c:
                r, got = await _stream(c, gw.url, chat(stream=True, usage=True))
                assert got == prov.sent[-1] and b'"usage"' in got
                assert key_used(gw) == 8
                _, got = await _stream(c, gw.url, chat(stream=True, usage=False))
                assert b'"usage"' not in got and key_used(gw) == 16
        finally:
            await prov.stop()
    asyncio.run(go())


def test_parallel_calls_cannot_overspend_the_budget(tmp_path: Path) -> None:
    """200 calls at once on a 1,000-token budget: reservations admit only what fits, so the
    key is charged at most its budget (before: every call passed and 1,600 were spent)."""
    async def go() -> None:
        prov = FakeProvider()
        prov.delay = 0.05  # every call is in flight together
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url, budget=1000)) as gw, \
                    httpx.AsyncClient(limits=httpx.Limits(max_connections=200),
                                      timeout=60) as c:
                body = chat(max_tokens=3)
                rs = await asyncio.gather(*[
                    c.post(gw.url + "/v1/chat/completions", content=body, headers=AUTH)
                    for _ in range(200)])
                ok = [r for r in rs if r.status_code == 200]
                refused = [r for r in rs if r.status_code == 429]
                assert len(ok) + len(refused) == 200 and ok and refused
                assert {r.json()["error"]["code"] for r in refused} == {"budget_exceeded"}
                assert key_used(gw) == 8 * len(ok) <= 1000
                assert len(prov.received) == len(ok)  # a refused call forwarded nothing
        finally:
            await prov.stop()
    asyncio.run(go())


def test_a_refused_call_releases_its_reservation(tmp_path: Path) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url, budget=300)) as gw, \
                    httpx.AsyncClient() as c:
                for _ in range(5):  # each reserves ~130 of 300 while it runs, then releases
                    bad = await c.post(gw.url + "/v1/chat/completions", headers=AUTH,
                                       content=chat(max_tokens=50).replace(b"chat-model",
                                                                           b"no-such"))
                    assert bad.status_code == 404
                assert key_used(gw) == 0
                prov.fail_status = 500  # the provider fails: nothing reported, nothing charged
                r = await c.post(gw.url + "/v1/chat/completions", content=chat(max_tokens=50),
                                 headers=AUTH)
                assert r.status_code == 502 and key_used(gw) == 0
                prov.fail_status = None
                r = await c.post(gw.url + "/v1/chat/completions", content=chat(max_tokens=50),
                                 headers=AUTH)
                assert r.status_code == 200 and key_used(gw) == 8
                big = await c.post(gw.url + "/v1/chat/completions", content=chat(max_tokens=500),
                                   headers=AUTH)
                assert big.status_code == 429  # could use more than is left: not forwarded
                assert len(prov.received) == 3  # the failed call tried both routes
        finally:
            await prov.stop()
    asyncio.run(go())


def test_reservation_bounds_prompt_and_completion() -> None:
    key = ApiKey("k", "0" * 64, token_budget=10_000, max_reserve_tokens=100)
    req = Request({"model": "m", "messages": [], "max_tokens": 7}, "m", False)
    assert reserve_tokens(key, req, 50) == 57
    req = Request({"model": "m", "messages": [], "max_completion_tokens": 5, "max_tokens": 9,
                   "n": 3}, "m", False)
    assert reserve_tokens(key, req, 50) == 65
    assert reserve_tokens(key, Request({"model": "m", "messages": []}, "m", False), 50) == 150
    assert reserve_tokens(key, Request({"model": "m", "input": "x"}, "m", False), 50) == 50


def test_limiter_reservations_are_atomic_and_settle_once() -> None:
    async def go() -> None:
        lim, key = Limiter(), ApiKey("k", "0" * 64, token_budget=100)
        a = await lim.reserve(key, 60)
        with pytest.raises(GatewayError) as e:
            await lim.reserve(key, 41)
        assert (e.value.status, e.value.code) == (429, "budget_exceeded")
        b = await lim.reserve(key, 40)
        await lim.settle(a, 10)
        await lim.settle(b, 0)
        assert lim.used(key) == 10
        assert (await lim.reserve(key, 90)).tokens == 90
    asyncio.run(go())


def test_usage_members_on_chunks_are_removed_for_a_client_that_did_not_ask(tmp_path: Path
                                                                          ) -> None:
    """Providers that follow OpenAI put `"usage": null` on every chunk once usage is asked
    for: a client that did not ask gets none of it."""
    async def go() -> None:
        prov = FakeProvider()
        prov.usage_on_chunks = True
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url, budget=100_000)) as gw, \
                    httpx.AsyncClient() as c:
                _, got = await _stream(c, gw.url, chat(stream=True))
                assert b'"usage":null' in prov.sent[-1].replace(b" ", b"")
                assert b'"usage"' not in got and b"COMPLETION-MARKER" in got
                assert key_used(gw) == 8
        finally:
            await prov.stop()
    asyncio.run(go())
