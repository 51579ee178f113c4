"""HTTP tests of the gateway app against a fake local provider, lease store and log.

Every test runs inside `gateway_stack` (tests/test_gateway_fakes.py), the one set-up:
a fake provider, optionally a fake log, the gateway in this event loop, and a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_gateway_fakes import (
    ADMIN_KEY,
    API_KEY,
    COMPLETION,
    MARKER,
    FakeLease,
    FakeLeaseStore,
    FakeVerificationError,
    Stack,
    gateway_stack,
    tls_server_context,
)
from tlog import checkpoint, note, proof
from verifier import receipt

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = (b'{"model": "chat-model",  "messages": [{"role": "user", "content": "'
        + MARKER.encode() + b'"}]}')


def D(resp: httpx.Response, data: bytes) -> str:
    """The receipt digest of `data` under the salt the gateway returned with `resp`."""
    return receipt.digest(bytes.fromhex(resp.headers["x-receipt-salt"]), data)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def fetch_receipt(s: Stack, rid: str, logged: bool = False) -> dict[str, Any]:
    """The gateway's `/v1/receipts/{rid}` document; with `logged`, once it has a proof."""
    for _ in range(500):
        r = await s.client.get(f"{s.url}/v1/receipts/{rid}", headers=AUTH)
        assert r.status_code == 200
        doc = r.json()
        if not logged or doc["proof"] is not None:
            return doc
        await asyncio.sleep(0.01)
    raise AssertionError("receipt never logged")


async def wait_log_down(s: Stack, down: bool) -> None:
    """Wait (bounded) until the gateway's log status says `down`."""
    for _ in range(200):
        if s.gw.app.svc.status.log_down == down:
            return
        await asyncio.sleep(0.01)
    assert s.gw.app.svc.status.log_down == down


def check_proof(doc: dict[str, Any], vkey: str) -> None:
    p = proof.parse(doc["proof"].encode())
    cp, _ = checkpoint.open(p.checkpoint, note.verifier_from_vkey(vkey))
    proof.check_inclusion(p, cp, receipt.entry(doc["receipt"]))
    assert p.index == doc["index"]


def test_chat_json_receipt_hashes_and_proof(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path, log=True) as s:
            prov, log = s.prov, s.log
            assert log is not None
            r = await s.client.post(s.url + "/v1/chat/completions", content=CHAT, headers=AUTH)
            assert r.status_code == 200
            assert r.headers["x-request-hash"] == D(r, CHAT)
            assert json.loads(prov.received[-1])["model"] == "upstream-chat-1"
            assert r.content == prov.sent[-1]
            doc = await fetch_receipt(s, r.headers["x-receipt-id"], logged=True)
            rc = doc["receipt"]
            pub = s.gw.receipt_key.public_key().public_bytes_raw()
            assert receipt.verify(rc, expected_key=pub) == pub
            assert rc["id"] == r.headers["x-receipt-id"]
            assert rc["request_hash"] == D(r, CHAT)
            assert rc["forwarded_hash"] == D(r, prov.received[-1])
            assert rc["provider_request_hash"] == D(r, prov.received[-1])
            assert rc["provider_response_hash"] == D(r, prov.sent[-1])
            assert rc["response_hash"] == D(r, r.content)
            assert rc["route"] == {"route_id": "r1", "model": "chat-model",
                                   "provider": "p1", "upstream_model": "upstream-chat-1"}
            assert rc["upstream"]["verified"] is True
            assert rc["upstream"]["lease_id"] == "lease-r1"
            assert rc["e2ee"] == {"mode": "none"}
            assert rc["usage"]["total_tokens"] == 8
            assert log.entries[doc["index"]] == receipt.entry(rc)
            check_proof(doc, log.vkey)
            by = await s.client.get(
                f"{s.url}/v1/receipts/by-request-hash/{r.headers['x-request-hash']}")
            assert by.json()["receipt"]["id"] == rc["id"]
    run(go())


def test_sse_stream_hash_covers_whole_stream(tmp_path: Path) -> None:
    async def go() -> None:
        body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        async with gateway_stack(tmp_path) as s:
            async with s.client.stream("POST", s.url + "/v1/chat/completions", content=body,
                                       headers=AUTH) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                got = b"".join([x async for x in r.aiter_raw()])
            assert got.endswith(b"data: [DONE]\n\n")
            assert got == s.prov.sent[-1]
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            assert rc["response_hash"] == D(r, got)
            assert rc["provider_response_hash"] == D(r, s.prov.sent[-1])
            assert rc["request_hash"] == D(r, body)
            assert rc["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                   "total_tokens": 8}
            assert rc["route"]["route_id"] == "r1"
    run(go())


def test_bad_input_is_4xx_never_5xx(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path) as s:
            c = s.client
            url = s.url + "/v1/chat/completions"
            cases: list[tuple[bytes, dict[str, str], int, str]] = [
                (b"{not json", AUTH, 400, "invalid_json"),
                (b"[1,2]", AUTH, 400, "invalid_request"),
                (b'{"messages": [{"role": "user", "content": "x"}]}', AUTH, 400,
                 "missing_required_parameter"),
                (b'{"model": 5, "messages": []}', AUTH, 400, "invalid_type"),
                (b'{"model": "chat-model", "messages": "hello"}', AUTH, 400, "invalid_type"),
                (b'{"model": "chat-model", "messages": [{"role": "user"}], "stream": "y"}',
                 AUTH, 400, "invalid_type"),
                (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
                 AUTH, 404, "model_not_found"),
                (b'{"model": "embed-model", "messages": [{"role": "user"}]}', AUTH, 404,
                 "model_not_found"),
                (b"\xff\xfe", AUTH, 400, "invalid_json"),
                (b"x" * 5000, AUTH, 413, "request_too_large"),
                (CHAT, {"Content-Type": "application/json"}, 401, "invalid_api_key"),
                (CHAT, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
                (CHAT, {"Authorization": "Basic abc"}, 401, "invalid_api_key"),
            ]
            for body, headers, status, code in cases:
                r = await c.post(url, content=body, headers=headers)
                assert r.status_code == status, (body[:40], r.text)
                err = r.json()["error"]
                assert err["code"] == code
                assert set(err) == {"message", "type", "code", "param"}
                if status not in (401, 413):
                    assert "x-receipt-id" in r.headers
                    assert r.headers["x-request-hash"] == D(r, body)
            r = await c.post(s.url + "/v1/embeddings", content=b'{"model": "embed-model"}',
                             headers=AUTH)
            assert (r.status_code, r.json()["error"]["param"]) == (400, "input")
            r = await c.get(url, headers=AUTH)
            assert r.status_code == 405
            r = await c.get(s.url + "/nope")
            assert r.status_code == 404
            r = await c.post(s.url + "/v1/models")
            assert r.status_code == 405
            r = await c.get(s.url + "/.well-known/attestation?nonce=zz")
            assert r.status_code == 400
            r = await c.get(s.url + "/v1/receipts/../../etc")
            assert r.status_code == 404
            r = await c.get(s.url + "/v1/receipts/by-request-hash/ABC")
            assert r.status_code == 400
            assert s.prov.received == []
    run(go())


def test_models_embeddings_attestation(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path) as s:
            c = s.client
            ids = [m["id"] for m in (await c.get(s.url + "/v1/models")).json()["data"]]
            assert ids == ["chat-model", "embed-model"]
            body = b'{"model": "embed-model", "input": ["a", "b"]}'
            r = await c.post(s.url + "/v1/embeddings", content=body, headers=AUTH)
            assert r.status_code == 200 and len(r.json()["data"]) == 2
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            assert rc["route"]["upstream_model"] == "upstream-embed"
            assert rc["response_hash"] == D(r, r.content)
            a = await c.get(s.url + "/.well-known/attestation?nonce=00ff")
            assert a.json()["nonce"] == "00ff"
    run(go())


def test_fallback_only_to_verified_routes(tmp_path: Path) -> None:
    async def go() -> None:
        store = FakeLeaseStore()
        store.outcomes["r1"] = FakeVerificationError("upstream_unverified", "bad quote")
        async with gateway_stack(tmp_path, store=store) as s:
            c, prov = s.client, s.prov
            url = s.url + "/v1/chat/completions"
            r = await c.post(url, content=CHAT, headers=AUTH)
            assert r.status_code == 200
            assert json.loads(prov.received[-1])["model"] == "upstream-chat-2"
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            assert rc["route"]["route_id"] == "r2"
            assert store.calls[:2] == ["r1", "r2"]

            store.outcomes["r2"] = FakeVerificationError("evidence_expired", "old")
            before = len(prov.received)
            r = await c.post(url, content=CHAT, headers=AUTH)
            assert r.status_code == 502
            err = r.json()["error"]
            assert err["code"] == "upstream_unverified"
            assert "'r1'" in err["message"] and "'r2'" in err["message"]
            assert MARKER not in r.text
            assert len(prov.received) == before  # not one byte went upstream
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            receipt.verify(rc)
            assert rc["refusal"] == {"code": "upstream_unverified", "status": 502}
            assert rc["upstream"]["verified"] is False
            assert rc["route"]["route_id"] == "r1"
            assert rc["forwarded_hash"] is None
            assert rc["provider_request_hash"] is None
            assert rc["provider_response_hash"] is None
            assert rc["response_hash"] == D(r, r.content)

            routes = await c.get(s.url + "/v1/routes")
            assert routes.status_code == 401
            routes = await c.get(s.url + "/v1/routes",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert routes.json()["receipts"] == 2
            state = {x["id"]: x for x in routes.json()["routes"]}
            assert state["r1"]["state"] == "refused"
            assert state["r1"]["last_error"].startswith("upstream_unverified")
            assert state["e1"]["state"] == "verified"
            assert state["e1"]["lease_expires_at"].endswith("Z")
    run(go())


def slow_route(base_url: str) -> str:
    """One chat route `m` with a short timeout and one retry."""
    return f"""
[[routes]]
id = "slow"
model = "m"
provider = "p"
base_url = "{base_url}"
timeout = 0.3
retries = 1
"""


def test_upstream_errors_map_to_502_and_504(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path, routes=slow_route, timeout=10) as s:
            c, prov = s.client, s.prov
            body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
            url = s.url + "/v1/chat/completions"
            prov.fail_status = 500
            r = await c.post(url, content=body, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_error")
            assert len(prov.received) == 2  # one retry
            prov.fail_status = 400
            r = await c.post(url, content=body, headers=AUTH)
            assert (r.status_code, r.json()["error"]) == (400, {  # a provider 4xx, as JSON
                "message": "provider answered HTTP 400: boom", "type": "upstream_error",
                "code": "upstream_rejected", "param": None})
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            assert rc["provider_response_hash"] == D(r, b'{"error":"boom"}')
            prov.fail_status = None
            prov.delay = 1.0
            r = await c.post(url, content=body, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (504, "upstream_timeout")
            prov.delay = 0
            await prov.stop()
            r = await c.post(url, content=body, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_unreachable")
    run(go())


def test_rate_limit_and_budget(tmp_path: Path) -> None:
    async def go() -> None:
        (tmp_path / "a").mkdir()
        async with gateway_stack(tmp_path / "a", rpm=2) as s:
            url = s.url + "/v1/chat/completions"
            codes = [(await s.client.post(url, content=CHAT, headers=AUTH)) for _ in range(3)]
            assert [r.status_code for r in codes] == [200, 200, 429]
            assert codes[2].json()["error"]["code"] == "rate_limit_exceeded"
        (tmp_path / "b").mkdir()
        # room for one call's reservation (body + max_reserve_tokens), not two
        async with gateway_stack(tmp_path / "b", budget=len(CHAT) + 4096) as s:
            url = s.url + "/v1/chat/completions"
            assert (await s.client.post(url, content=CHAT, headers=AUTH)).status_code == 200
            r = await s.client.post(url, content=CHAT, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (429, "budget_exceeded")
    run(go())


def test_no_content_in_outbox_log_or_log_lines(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        store = FakeLeaseStore()
        async with gateway_stack(tmp_path, log=True, store=store) as s:
            assert s.log is not None
            c, log = s.client, s.log
            url = s.url + "/v1/chat/completions"
            ok = await c.post(url, content=CHAT, headers=AUTH)
            stream = json.loads(CHAT)
            stream["stream"] = True
            async with c.stream("POST", url, json=stream, headers=AUTH) as streamed:
                await streamed.aread()
            bad = await c.post(url, content=CHAT[:-3], headers=AUTH)
            store.outcomes["r1"] = FakeVerificationError("upstream_unverified", "x")
            store.outcomes["r2"] = FakeVerificationError("binding_mismatch", "y")
            refused = await c.post(url, content=CHAT, headers=AUTH)
            assert (ok.status_code, bad.status_code, refused.status_code) == (200, 400, 502)
            assert COMPLETION in ok.text
            for r in (ok, streamed, refused):
                await fetch_receipt(s, r.headers["x-receipt-id"], logged=True)
        db = tmp_path / "data" / "outbox.sqlite3"
        blobs = b"".join(p.read_bytes() for p in db.parent.iterdir())
        conn = sqlite3.connect(db)
        conn.execute("ATTACH DATABASE ? AS ledger", (str(db.parent / "ledger.sqlite3"),))
        rows = conn.execute("SELECT r.entry, l.proof FROM receipts r "
                            "LEFT JOIN ledger.logged l ON l.seq = r.seq").fetchall()
        assert len(rows) == 4
        texts = [caplog.text.encode(), blobs, b"".join(log.entries),
                 b"".join(bytes(e) + (p or b"") for e, p in rows)]
        for t in texts:
            for marker in (MARKER, COMPLETION):
                assert marker.encode() not in t
    caplog.set_level(logging.DEBUG)
    run(go())


def test_require_log_inclusion_waits_for_proof(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path, log=True,
                                 extra_gateway="require_log_inclusion = true\n"
                                               "log_wait_timeout = 0.5") as s:
            assert s.log is not None
            c, log = s.client, s.log
            url = s.url + "/v1/chat/completions"
            r = await c.post(url, content=CHAT, headers=AUTH)
            assert r.status_code == 200
            doc = (await c.get(f"{s.url}/v1/receipts/{r.headers['x-receipt-id']}",
                               headers=AUTH)).json()
            assert doc["index"] is not None
            check_proof(doc, log.vkey)
            log.fail = True
            r = await c.post(url, content=CHAT, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (503, "log_unavailable")
            rid = r.headers["x-receipt-id"]
            log.fail = False
            doc = await fetch_receipt(s, rid, logged=True)
            check_proof(doc, log.vkey)
    run(go())


def test_log_unavailable_refuse_then_recover(tmp_path: Path) -> None:
    async def go() -> None:
        # the gateway listens only once its keyset entry is logged: the log goes down after
        async with gateway_stack(tmp_path, log=True,
                                 extra_gateway='log_unavailable = "refuse"') as s:
            assert s.log is not None
            c, log = s.client, s.log
            await log.stop()
            url = s.url + "/v1/chat/completions"
            first = await c.post(url, content=CHAT, headers=AUTH)
            assert first.status_code == 200  # served; its receipt waits in the outbox
            await wait_log_down(s, True)
            r = await c.post(url, content=CHAT, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (503, "log_unavailable")
            await log.start()
            for rid in (first.headers["x-receipt-id"], r.headers["x-receipt-id"]):
                check_proof(await fetch_receipt(s, rid, logged=True), log.vkey)
            await wait_log_down(s, False)
            assert (await c.post(url, content=CHAT, headers=AUTH)).status_code == 200
    run(go())


def test_tls_spki_binding_is_enforced_before_any_byte(tmp_path: Path) -> None:
    async def go() -> None:
        ctx, spki = tls_server_context(tmp_path)
        store = FakeLeaseStore()
        store.outcomes["r1"] = FakeLease("l1", binding=f"tls_spki_sha256:{spki}")
        store.outcomes["r2"] = FakeLease("l2", binding="tls_spki_sha256:" + "00" * 32)
        async with gateway_stack(tmp_path, store=store, tls=ctx) as s:
            url = s.url + "/v1/chat/completions"
            r = await s.client.post(url, content=CHAT, headers=AUTH)
            assert r.status_code == 200, r.text
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            assert rc["upstream"]["binding"] == f"tls_spki_sha256:{spki}"
            assert rc["provider_response_hash"] == D(r, s.prov.sent[-1])
            store.outcomes["r1"] = FakeVerificationError("evidence_expired", "stale")
            before = len(s.prov.received)
            r = await s.client.post(url, content=CHAT, headers=AUTH)
            assert r.status_code == 502
            assert "binding_mismatch" in r.json()["error"]["message"]
            assert len(s.prov.received) == before  # the pinned key failed: nothing sent

        (tmp_path / "plain").mkdir()
        store = FakeLeaseStore()
        for rid in ("r1", "r2"):
            store.outcomes[rid] = FakeLease(rid, binding=f"tls_spki_sha256:{spki}")
        async with gateway_stack(tmp_path / "plain", store=store) as s:
            r = await s.client.post(s.url + "/v1/chat/completions", content=CHAT, headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (502, "binding_mismatch")
            assert s.prov.received == []
    run(go())


def test_broken_stream_still_gets_a_receipt(tmp_path: Path) -> None:
    async def go() -> None:
        body = {"model": "chat-model", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        async with gateway_stack(tmp_path) as s:
            s.prov.break_stream = True
            async with s.client.stream("POST", s.url + "/v1/chat/completions", json=body,
                                       headers=AUTH) as r:
                got = b"".join([x async for x in r.aiter_raw()])
            assert r.status_code == 200 and b"[DONE]" not in got
            rc = (await fetch_receipt(s, r.headers["x-receipt-id"]))["receipt"]
            assert rc["refusal"] == {"code": "upstream_stream_broken", "status": 200}
            assert rc["response_hash"] == D(r, got)
            s.prov.break_stream = False
            r = await s.client.post(s.url + "/v1/chat/completions", content=CHAT, headers=AUTH)
            assert r.status_code == 200  # the pool dropped the broken connection
    run(go())


json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["chat-model", "embed-model", "gpt-4o-mini", "user"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["model", "messages", "role", "content", "stream", "input",
                         "stream_options", "text", "type", "x"]), inner, max_size=4),
    max_leaves=12)


def test_fuzzed_bodies_never_5xx_or_crash(tmp_path: Path) -> None:
    """Any body, straight into the ASGI app: a 4xx, or the route refusal (every route is
    refused here), and not one byte reaches the provider."""
    async def go() -> None:
        store = FakeLeaseStore()
        for rid in ("r1", "r2", "e1"):
            store.outcomes[rid] = FakeVerificationError("upstream_unverified", "fuzz")
        async with gateway_stack(tmp_path, store=store) as s:
            app = s.gw.app

            async def call(path: str, body: bytes, extra: list[tuple[bytes, bytes]]) -> int:
                sent: list[dict[str, Any]] = []

                async def receive() -> dict[str, Any]:
                    return {"type": "http.request", "body": body, "more_body": False}

                async def send(m: dict[str, Any]) -> None:
                    sent.append(m)

                scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
                         "headers": [(b"authorization", AUTH["Authorization"].encode()),
                                     *extra]}
                await app(scope, receive, send)
                assert sent[0]["type"] == "http.response.start"
                return sent[0]["status"]

            @settings(max_examples=300, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
            @given(st.one_of(json_bodies.map(lambda v: json.dumps(v).encode()),
                             st.binary(max_size=64)),
                   st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]),
                   st.sampled_from([[], [(b"x-e2ee-version", b"aci-1")],
                                    [(b"x-e2ee-version", b"aci-1"), (b"x-e2ee-enc", b"AAAA"),
                                     (b"x-client-pub-key", b"!!")]]))
            def check(body: bytes, path: str, extra: list[tuple[bytes, bytes]]) -> None:
                status = asyncio.run_coroutine_threadsafe(call(path, body, extra), loop).result()
                assert status in (400, 404, 502), (body, status)

            loop = asyncio.get_running_loop()
            await asyncio.to_thread(check)
            assert s.prov.received == []
    run(go())


def test_openai_sdk_json_stream_and_embeddings(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")

    async def go() -> None:
        async with gateway_stack(tmp_path) as s:
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=API_KEY)
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-receipt-id"]
            assert raw.parse().choices[0].message.content == COMPLETION
            stream = await client.chat.completions.create(
                model="chat-model", messages=[{"role": "user", "content": "hi"}],
                stream=True, stream_options={"include_usage": True})
            parts = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            assert text == COMPLETION + " and more"
            assert parts[-1].usage is not None and parts[-1].usage.total_tokens == 8
            emb = await client.embeddings.create(model="embed-model", input=["a", "b"])
            assert [d.embedding for d in emb.data] == [[0.25, -0.5, 0.0], [0.25, -0.5, 1.0]]
            with pytest.raises(openai.NotFoundError) as e:
                await client.chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "hi"}])
            assert e.value.code == "model_not_found"
            await client.close()
    run(go())
