"""The demo provider: deterministic OpenAI-compatible answers, SSE with usage, 4xx on bad input."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer

from gateway.demo import provider as dp

CHAT = {"model": "demo-chat-1", "messages": [{"role": "user", "content": "one two three"}]}


async def _attest(nonce: str | None) -> dict[str, Any]:
    return {"simulated": True, "nonce": nonce}


def run(fn: Callable[[TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(dp.make_app(_attest))) as c:
            await fn(c)
    asyncio.run(main())


def test_chat_is_deterministic_and_counts_usage() -> None:
    async def go(c: TestClient) -> None:
        body = orjson.dumps(CHAT)
        a = await c.post("/v1/chat/completions", data=body)
        b = await c.post("/v1/chat/completions", data=body)
        other = await c.post("/v1/chat/completions",
                             data=orjson.dumps(dict(CHAT, model="x")))
        assert a.status == 200 and a.headers["Content-Type"] == "application/json"
        ra, rb = await a.read(), await b.read()
        assert ra == rb != await other.read()
        doc = orjson.loads(ra)
        text = doc["choices"][0]["message"]["content"]
        assert doc["object"] == "chat.completion" and doc["model"] == "demo-chat-1"
        assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": len(text.split()),
                                "total_tokens": 3 + len(text.split())}
    run(go)


def test_max_tokens_truncates() -> None:
    async def go(c: TestClient) -> None:
        r = await c.post("/v1/chat/completions", json=dict(CHAT, max_tokens=2))
        doc = await r.json()
        assert len(doc["choices"][0]["message"]["content"].split()) == 2
        assert doc["choices"][0]["finish_reason"] == "length"
    run(go)


def test_stream_matches_the_json_answer_and_ends_with_usage_and_done() -> None:
    async def go(c: TestClient) -> None:
        req = dict(CHAT, stream=True, stream_options={"include_usage": True})
        r = await c.post("/v1/chat/completions", json=req)
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
        events = raw.split(b"\n\n")
        assert events[-2:] == [b"data: [DONE]", b""]
        chunks = [orjson.loads(e[len(b"data: "):]) for e in events[:-2]]
        text = "".join(ch["choices"][0]["delta"].get("content", "")
                       for ch in chunks if ch["choices"])
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == len(text.split())
        assert all(ch["usage"] is None for ch in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        plain = await c.post("/v1/chat/completions", json=dict(CHAT, stream=True))
        assert b'"usage"' not in await plain.read()
        assert text.startswith("[demo ")
    run(go)


def test_embeddings_float_and_base64_agree() -> None:
    async def go(c: TestClient) -> None:
        f = await (await c.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]})
                   ).json()
        b = await (await c.post("/v1/embeddings", json={
            "model": "m", "input": ["a", "b"], "encoding_format": "base64"})).json()
        assert [d["index"] for d in f["data"]] == [0, 1]
        vec = f["data"][0]["embedding"]
        assert len(vec) == dp.EMBED_DIM and vec != f["data"][1]["embedding"]
        assert abs(sum(v * v for v in vec) - 1.0) < 1e-3
        decoded = struct.unpack(f"<{dp.EMBED_DIM}f",
                                base64.b64decode(b["data"][0]["embedding"]))
        assert all(abs(x - y) < 1e-6 for x, y in zip(decoded, vec, strict=True))
        one = await (await c.post("/v1/embeddings", json={
            "model": "m", "input": "a", "dimensions": 8})).json()
        assert len(one["data"]) == 1 and len(one["data"][0]["embedding"]) == 8
    run(go)


def test_bad_input_is_an_openai_shaped_400() -> None:
    async def go(c: TestClient) -> None:
        cases: list[tuple[str, bytes]] = [
            ("/v1/chat/completions", b"{not json"),
            ("/v1/chat/completions", b"[]"),
            ("/v1/chat/completions", orjson.dumps({"model": "m"})),
            ("/v1/chat/completions", orjson.dumps(dict(CHAT, stream="yes"))),
            ("/v1/chat/completions", orjson.dumps(dict(CHAT, max_tokens=0))),
            ("/v1/embeddings", orjson.dumps({"model": "m", "input": []})),
            ("/v1/embeddings", orjson.dumps({"model": "m", "input": "a", "dimensions": 0})),
            ("/v1/embeddings", orjson.dumps({"model": "m", "input": [{"x": 1}]})),
            ("/v1/embeddings", b"\xff"),
        ]
        for path, body in cases:
            r = await c.post(path, data=body)
            assert r.status == 400, (path, body)
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "code", "param"}
        r = await c.get("/nope")
        assert r.status == 404
    run(go)


def test_models_and_attestation_nonce() -> None:
    async def go(c: TestClient) -> None:
        ids = [m["id"] for m in (await (await c.get("/v1/models")).json())["data"]]
        assert ids == [dp.CHAT_MODEL, dp.EMBED_MODEL]
        doc = await (await c.get("/.well-known/attestation?nonce=AB01")).json()
        assert doc["nonce"] == "ab01"
        assert (await c.get("/.well-known/attestation?nonce=xyz")).status == 400
        assert (await (await c.get("/.well-known/attestation")).json())["nonce"] is None
    run(go)
