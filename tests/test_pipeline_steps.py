"""Each step of a model call (gateway/api/pipeline.py) tested alone, with small fakes.

No server runs here: the steps get hand-built ASGI messages, a fake lease store
(tests/test_gateway_fakes.py), a fake upstream that records what it was sent, and
an in-memory outbox and log status. The HTTP tests (tests/test_gateway_http.py)
check the same promises end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.api import pipeline
from gateway.api.apikeys import KeyStore, hash_key
from gateway.api.config import ApiKey, Config, GatewaySettings, LogSettings, RouteSpec
from gateway.api.errors import GatewayError
from gateway.api.ratelimit import Hold, Limiter
from gateway.api.router import Router
from gateway.api.routes import RouteBook
from gateway.receipts.outbox import ReceiptSigner
from gateway.upstream.client import UpstreamReply
from gateway.upstream.leases import LeaseFacts, Leases
from gateway.verification.base import SIGNATURE_BINDING
from tests.test_gateway_fakes import (
    API_KEY,
    COMPLETION,
    IDENTITY,
    MARKER,
    FakeLease,
    FakeLeaseStore,
    FakeVerificationError,
)
from tlog.http1 import ProtocolError
from verifier import aci, receipt, sse

SALT = bytes(range(32))
KEY = ApiKey("test", hash_key(API_KEY))
KEYSET_INDEX = 7  # where the (fake) log holds the gateway's keyset entry
AUTH = f"Bearer {API_KEY}".encode()
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": MARKER}]}
PIN = "tls_spki_sha256:" + "aa" * 32


def route(rid: str, model: str = "chat-model", *, priority: int = 0, kind: str = "chat",
          https: bool = False, evidence: str = "dstack") -> RouteSpec:
    scheme = "https" if https else "http"
    return RouteSpec(id=rid, model=model, provider=f"p-{rid}", priority=priority, kind=kind,
                     base_url=f"{scheme}://127.0.0.1:9/v1", upstream_model=f"up-{rid}",
                     evidence=evidence)


ROUTES = (route("r1"), route("r2", priority=1), route("e1", "embed-model", kind="embeddings"))


class FakeUpstream:
    """Records each send; answers per route: a reply, or the GatewayError to raise."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes, bool]] = []  # (route, lease, body, stream)
        self.answers: dict[str, UpstreamReply | GatewayError] = {}

    async def send(self, route: RouteSpec, lease: LeaseFacts, path: str, body: bytes,
                   stream: bool, headers: dict[str, str] | None = None) -> UpstreamReply:
        self.sent.append((route.id, lease.lease_id, body, stream))
        out = self.answers.get(route.id, reply(b'{"id": "c1"}'))
        if isinstance(out, GatewayError):
            raise out
        return out


class MemoryOutbox:
    """Keeps put entries in memory, in order; `admit` answers `refusal`."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, str, bytes]] = []
        self.owners: list[str | None] = []
        self.refusal: str | None = None

    async def admit(self) -> str | None:
        return self.refusal

    async def put(self, receipt_id: str, request_hash: str, entry: bytes,
                  key_sha256: str | None = None) -> None:
        self.puts.append((receipt_id, request_hash, entry))
        self.owners.append(key_sha256)


@dataclass
class FakeStatus:
    """The log status the steps read; `wait_logged` answers `logged` and records its calls."""

    enabled: bool = True
    log_down: bool = False
    logged: bool = True
    stopping: bool = False
    waits: list[tuple[str, float]] = field(default_factory=list)

    async def wait_logged(self, receipt_id: str, timeout: float) -> bool:
        self.waits.append((receipt_id, timeout))
        return self.logged


def reply(body: bytes, status: int = 200, ctype: str = "application/json") -> UpstreamReply:
    return UpstreamReply(status, ctype, body)


def services(*, routes: tuple[RouteSpec, ...] = ROUTES, store: FakeLeaseStore | None = None,
             key: ApiKey = KEY, e2ee_key: bytes | None = None,
             **gateway: Any) -> pipeline.Services:
    """Services over fakes: the real key store, limiter, router and route book."""
    cfg = Config(path=Path("gateway.toml"), gateway=GatewaySettings(**gateway),
                 dstack_endpoint=None, log=LogSettings(), api_keys=(key,), routes=routes)
    router = Router(routes)
    leases = Leases(store or FakeLeaseStore(), FakeVerificationError)
    return pipeline.Services(
        cfg=cfg, keys=KeyStore(cfg.api_keys), limiter=Limiter(), router=router,
        routes=RouteBook(router.routes, leases), signer=ReceiptSigner(Ed25519PrivateKey
                                                                      .generate()),
        outbox=MemoryOutbox(), status=FakeStatus(), identity=IDENTITY,  # type: ignore[arg-type]
        keyset_index=KEYSET_INDEX, e2ee_key=e2ee_key,
        upstream=FakeUpstream())  # type: ignore[arg-type]


def new_call(kind: str = "chat", key: ApiKey = KEY) -> pipeline.Call:
    return pipeline.Call("0" * 32, SALT, receipt.digest(SALT, b"{}"), kind, key)


def request(obj: dict[str, Any] = CHAT, kind: str = "chat") -> pipeline.Request:
    return pipeline.parse(json.dumps(obj).encode(), kind)


def refusal(e: pytest.ExceptionInfo[GatewayError]) -> tuple[int, str]:
    return e.value.status, e.value.code


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- read_body -----------------------------------------------------------------------


class Messages:
    """An ASGI `receive` replaying messages, counting how many were taken."""

    def __init__(self, *msgs: dict[str, Any]) -> None:
        self.msgs = list(msgs)
        self.taken = 0

    async def __call__(self) -> dict[str, Any]:
        self.taken += 1
        return self.msgs.pop(0)


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers)}


def test_read_body_joins_chunks_up_to_the_limit_exactly() -> None:
    rx = Messages(body(b"ab", True), body(b"", True), body(b"cd"))
    assert run(pipeline.read_body(scope(), rx, 4)) == b"abcd"
    assert rx.taken == 3


def test_read_body_refuses_a_declared_length_over_the_limit_before_reading() -> None:
    rx = Messages(body(b"x"))
    with pytest.raises(GatewayError) as e:
        run(pipeline.read_body(scope((b"content-length", b"5")), rx, 4))
    assert refusal(e) == (413, "request_too_large")
    assert rx.taken == 0


def test_read_body_stops_reading_once_the_body_outgrows_the_limit() -> None:
    """A client lying about (or omitting) its length is cut off at the limit."""
    rx = Messages(body(b"abc", True), body(b"de", True), body(b"never read"))
    with pytest.raises(GatewayError) as e:
        run(pipeline.read_body(scope((b"content-length", b"3")), rx, 4))
    assert refusal(e) == (413, "request_too_large")
    assert rx.taken == 2


@pytest.mark.parametrize("length", [b"-1", b"1e3", b"", b" 4", b"0x10", b"\xff"])
def test_read_body_refuses_a_malformed_length(length: bytes) -> None:
    with pytest.raises(GatewayError) as e:
        run(pipeline.read_body(scope((b"content-length", length)), Messages(), 4))
    assert refusal(e) == (400, "invalid_request")


def test_read_body_disconnect_is_a_4xx() -> None:
    rx = Messages(body(b"ab", True), {"type": "http.disconnect"})
    with pytest.raises(GatewayError) as e:
        run(pipeline.read_body(scope(), rx, 100))
    assert refusal(e) == (400, "client_disconnected")


# -- receipt_salt, authenticate, admit -----------------------------------------------


def test_receipt_salt_is_the_callers_or_fresh() -> None:
    assert pipeline.receipt_salt({b"x-receipt-salt": SALT.hex().upper().encode()}) == SALT
    fresh = {pipeline.receipt_salt({}) for _ in range(4)}
    assert len(fresh) == 4 and all(len(s) == 32 for s in fresh)


@pytest.mark.parametrize("given", [b"", b"00" * 31, b"00" * 33, b"zz" * 32, b"\xff" * 64,
                                   b" " + b"00" * 32])
def test_receipt_salt_malformed_is_400(given: bytes) -> None:
    with pytest.raises(GatewayError) as e:
        pipeline.receipt_salt({b"x-receipt-salt": given})
    assert refusal(e) == (400, "invalid_receipt_salt")


def test_receipt_ids_are_unguessable_and_sort_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 hex digits (what GET /v1/receipts/{id} accepts): the time in milliseconds, then
    80 random bits."""
    now = [1_765_000_000_000_000_000]
    monkeypatch.setattr(pipeline.time, "time_ns", lambda: now[0])
    same_ms = [pipeline.new_receipt_id() for _ in range(1000)]
    assert len(set(same_ms)) == 1000  # the random part differs within one millisecond
    assert {i[:12] for i in same_ms} == {f"{1_765_000_000_000:012x}"}
    now[0] += 1_000_000
    later = pipeline.new_receipt_id()
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in [*same_ms, later])
    assert later > max(same_ms)  # a later millisecond sorts after, whatever the random part


def test_authenticate_accepts_only_the_bearer_key() -> None:
    keys = KeyStore([KEY])
    assert pipeline.authenticate(keys, {b"authorization": AUTH}) is KEY
    assert pipeline.authenticate(keys, {b"authorization": b"bearer  " + API_KEY.encode()}) is KEY
    for bad in (None, b"", b"Bearer", b"Bearer wrong", b"Basic " + API_KEY.encode(),
                API_KEY.encode(), b"Bearer \xff" + API_KEY.encode()):
        hdrs = {} if bad is None else {b"authorization": bad}
        with pytest.raises(GatewayError) as e:
            pipeline.authenticate(keys, hdrs)
        assert refusal(e) == (401, "invalid_api_key")


def test_admit_enforces_rate_then_budget() -> None:
    svc = services()
    limited = ApiKey("limited", hash_key("k2"), requests_per_minute=1, token_budget=10)
    run(pipeline.admit(svc, limited))
    with pytest.raises(GatewayError) as e:
        run(pipeline.admit(svc, limited))
    assert refusal(e) == (429, "rate_limit_exceeded")
    budget = ApiKey("budget", hash_key("k3"), token_budget=10)
    run(pipeline.admit(svc, budget))
    run(svc.limiter.settle(Hold(budget.sha256, 0), 10))
    with pytest.raises(GatewayError) as e:
        run(pipeline.admit(svc, budget))
    assert refusal(e) == (429, "budget_exceeded")


def test_admit_refuses_while_the_log_is_down_only_under_the_refuse_policy() -> None:
    queue = services()
    queue.status.log_down = True
    run(pipeline.admit(queue, KEY))  # serve-and-queue: served, the receipt waits
    strict = services(log_unavailable="refuse")
    run(pipeline.admit(strict, KEY))
    strict.status.log_down = True
    with pytest.raises(GatewayError) as e:
        run(pipeline.admit(strict, KEY))
    assert refusal(e) == (503, "log_unavailable")


# -- parse ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "raw", "code", "param"), [
    ("chat", b"{not json", "invalid_json", None),
    ("chat", b"\xff\xfe", "invalid_json", None),
    ("chat", b"", "invalid_json", None),
    ("chat", b"[1]", "invalid_request", None),
    ("chat", b'"text"', "invalid_request", None),
    ("chat", b'{"messages": [{"role": "user"}]}', "missing_required_parameter", "model"),
    ("chat", b'{"model": "", "messages": [{"role": "user"}]}', "invalid_type", "model"),
    ("chat", b'{"model": ["m"], "messages": [{"role": "user"}]}', "invalid_type", "model"),
    ("chat", b'{"model": "m"}', "missing_required_parameter", "messages"),
    ("chat", b'{"model": "m", "messages": []}', "invalid_type", "messages"),
    ("chat", b'{"model": "m", "messages": [{"content": "x"}]}', "invalid_type", "messages"),
    ("chat", b'{"model": "m", "messages": [{"role": 1}]}', "invalid_type", "messages"),
    ("chat", b'{"model": "m", "messages": ["user"]}', "invalid_type", "messages"),
    ("chat", b'{"model": "m", "messages": [{"role": "user"}], "stream": 1}', "invalid_type",
     "stream"),
    ("chat", b'{"model": "m", "messages": [{"role": "user"}], "stream_options": []}',
     "invalid_type", "stream_options"),
    ("embeddings", b'{"model": "m"}', "missing_required_parameter", "input"),
    ("embeddings", b'{"model": "m", "input": []}', "invalid_type", "input"),
    ("embeddings", b'{"model": "m", "input": 5}', "invalid_type", "input"),
    ("embeddings", b'{"model": "m", "input": "a", "stream": true}', "invalid_type", "stream"),
])
def test_parse_refuses_with_the_field_named(kind: str, raw: bytes, code: str,
                                            param: str | None) -> None:
    with pytest.raises(GatewayError) as e:
        pipeline.parse(raw, kind)
    assert refusal(e) == (400, code)
    assert e.value.param == param


def test_parse_returns_model_stream_and_the_whole_object() -> None:
    obj = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "extra": [1]}
    req = pipeline.parse(json.dumps(obj).encode(), "chat")
    assert (req.model, req.stream, req.obj) == ("chat-model", True, obj)
    emb = pipeline.parse(b'{"model": "e", "input": ["a"], "stream": false}', "embeddings")
    assert (emb.model, emb.stream) == ("e", False)


# -- open_e2ee -----------------------------------------------------------------------


E2EE_SK = X25519PrivateKey.generate()
E2EE_PUB = E2EE_SK.public_key().public_bytes_raw()


def sealed_chat(obj: dict[str, Any] = CHAT) -> tuple[pipeline.Request, dict[bytes, bytes],
                                                     aci.Opener]:
    sealed, headers, opener = aci.seal_request(obj, "chat", E2EE_PUB, now=time.time())
    return request(sealed), {k.encode(): v.encode() for k, v in headers.items()}, opener


def start(opener: aci.Opener, sealer: Any) -> None:
    opener.start({k.decode(): v.decode() for k, v in sealer.headers()})


def test_open_e2ee_passes_a_plain_request_unchanged() -> None:
    svc, call, req = services(), new_call(), request()
    assert run(pipeline.open_e2ee(svc, call, req, {})) is None
    assert req.obj == CHAT and call.e2ee_mode == "none"


def test_open_e2ee_opens_fields_and_returns_the_response_sealer() -> None:
    svc, call = services(e2ee_key=E2EE_SK.private_bytes_raw()), new_call()
    req, hdrs, opener = sealed_chat()
    assert MARKER not in json.dumps(req.obj)
    sealer = run(pipeline.open_e2ee(svc, call, req, hdrs))
    assert sealer is not None
    assert req.obj == CHAT and call.e2ee_mode == "aci-1"
    out = sealer.seal_response({"choices": [{"message": {"content": COMPLETION}}]})
    assert COMPLETION not in json.dumps(out)
    start(opener, sealer)
    assert opener.open_response(out)["choices"][0]["message"]["content"] == COMPLETION


def test_open_e2ee_refusals_name_no_content() -> None:
    svc = services(e2ee_key=E2EE_SK.private_bytes_raw())
    req, hdrs, _ = sealed_chat()
    plain = request()  # a plaintext body under E2EE headers
    other_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    cases: list[tuple[pipeline.Request, dict[bytes, bytes], str]] = [
        (plain, hdrs, "e2ee_decryption_failed"),
        (req, {**hdrs, b"x-e2ee-version": b"aci-2"}, "e2ee_invalid_version"),
        (req, {**hdrs, b"x-client-pub-key": b"!!"}, "e2ee_invalid_public_key"),
        (req, {**hdrs, b"x-e2ee-enc": b"AAAA"}, "e2ee_invalid_public_key"),
        (req, {k: v for k, v in hdrs.items() if k != b"x-e2ee-enc"}, "e2ee_header_missing"),
        (req, {**hdrs, b"x-model-pub-key": base64.b64encode(other_key)},
         "e2ee_model_key_mismatch"),
        (sealed_chat()[0], {**hdrs, b"x-client-pub-key": base64.b64encode(other_key)},
         "e2ee_decryption_failed"),
    ]
    for r, h, code in cases:
        call = new_call()
        with pytest.raises(GatewayError) as e:
            run(pipeline.open_e2ee(svc, call, pipeline.Request(dict(r.obj), r.model, r.stream),
                                   h))
        assert refusal(e) == (400, code), h
        assert MARKER not in e.value.message
        assert call.e2ee_mode == "none"
    with pytest.raises(GatewayError) as e:
        run(pipeline.open_e2ee(services(), new_call(), req, hdrs))
    assert refusal(e) == (400, "e2ee_unavailable")
    run(pipeline.open_e2ee(svc, new_call(), pipeline.Request(dict(req.obj), req.model,
                                                             req.stream), hdrs))
    with pytest.raises(GatewayError) as e:  # the same nonce again
        run(pipeline.open_e2ee(svc, new_call(), req, hdrs))
    assert refusal(e) == (400, "e2ee_replay_detected")


# -- route_and_forward ---------------------------------------------------------------


def test_unknown_model_acquires_no_lease() -> None:
    store = FakeLeaseStore()
    svc = services(store=store)
    for model, kind, suffix in (("nope", "chat", False), ("embed-model", "chat", True)):
        with pytest.raises(GatewayError) as e:
            run(pipeline.route_and_forward(svc, new_call(kind), request({**CHAT,
                                                                          "model": model})))
        assert refusal(e) == (404, "model_not_found")
        assert e.value.message.endswith("on this endpoint") is suffix
    assert store.calls == [] and svc.upstream.sent == []  # type: ignore[union-attr]


def test_forward_goes_to_the_first_route_whose_lease_holds() -> None:
    store = FakeLeaseStore()
    store.outcomes["r1"] = FakeVerificationError("upstream_unverified", "bad quote")
    svc, call = services(store=store), new_call()
    got = run(pipeline.route_and_forward(svc, call, request()))
    assert got.status == 200 and call.upstream_status == 200
    sent = svc.upstream.sent  # type: ignore[union-attr]
    assert [(r, lease) for r, lease, _, _ in sent] == [("r2", "lease-r2")]
    assert json.loads(sent[0][2]) == {**CHAT, "model": "up-r2"}
    assert call.route is not None and call.route.id == "r2"
    assert call.forwarded_hash == call.provider_request_hash == receipt.digest(SALT, sent[0][2])
    assert call.attempts == []


def test_all_leases_refused_sends_nothing_and_names_every_route() -> None:
    store = FakeLeaseStore()
    store.outcomes["r1"] = FakeVerificationError("evidence_expired", "old")
    store.outcomes["r2"] = FakeVerificationError("upstream_unverified", "bad")
    svc, call = services(store=store), new_call()
    with pytest.raises(GatewayError) as e:
        run(pipeline.route_and_forward(svc, call, request()))
    assert refusal(e) == (502, "evidence_expired")  # no upstream failure: the first refusal
    assert e.value.route_id == "r1"
    assert "'r1'" in e.value.message and "'r2'" in e.value.message
    assert MARKER not in e.value.message
    assert svc.upstream.sent == []  # type: ignore[union-attr]
    assert call.forwarded_hash is None and call.route is None


def test_an_upstream_failure_outranks_a_lease_refusal() -> None:
    """r1's lease is refused, r2 times out: the caller learns of the timeout (504)."""
    store = FakeLeaseStore()
    store.outcomes["r1"] = FakeVerificationError("upstream_unverified", "bad")
    svc, call = services(store=store), new_call()
    svc.upstream.answers["r2"] = GatewayError(504, "upstream_timeout", "slow",  # type: ignore
                                              route_id="r2")
    with pytest.raises(GatewayError) as e:
        run(pipeline.route_and_forward(svc, call, request()))
    assert refusal(e) == (504, "upstream_timeout")
    assert call.attempts == ["r2:upstream_timeout"]
    assert call.forwarded_hash is not None  # r2 was sent the request


def test_a_signature_bound_lease_never_carries_a_stream() -> None:
    store = FakeLeaseStore()
    for rid in ("r1", "r2"):
        store.outcomes[rid] = FakeLease(f"l-{rid}", binding=SIGNATURE_BINDING + "0x" + "11" * 20)
    svc, call = services(store=store), new_call()
    with pytest.raises(GatewayError) as e:
        run(pipeline.route_and_forward(svc, call, request({**CHAT, "stream": True})))
    assert refusal(e) == (502, "binding_mismatch")
    assert svc.upstream.sent == [] and call.forwarded_hash is None  # type: ignore[union-attr]


def pinned_services(store: FakeLeaseStore) -> pipeline.Services:
    return services(routes=(route("r1", https=True), route("r2", priority=1, https=True)),
                    store=store)


def test_a_rotated_provider_key_is_reverified_once_then_forwarded() -> None:
    store = FakeLeaseStore()
    store.outcomes["r1"] = FakeLease("l1", binding=PIN)
    svc, call = pinned_services(store), new_call()
    upstream: FakeUpstream = svc.upstream  # type: ignore[assignment]
    first = upstream.send

    async def rotate(route: RouteSpec, lease: LeaseFacts, *rest: Any) -> UpstreamReply:
        if lease.lease_id == "l1":  # the handshake shows another key: nothing was sent
            store.outcomes["r1"] = FakeLease("l2", binding="tls_spki_sha256:" + "bb" * 32)
            raise GatewayError(502, "binding_mismatch", "key differs", route_id=route.id)
        return await first(route, lease, *rest)

    upstream.send = rotate  # type: ignore[method-assign]
    run(pipeline.route_and_forward(svc, call, request()))
    assert call.lease is not None and call.lease.lease_id == "l2"
    assert call.attempts == ["r1:binding_mismatch"]
    assert "invalidate:r1:l1" in store.calls
    assert [(r, lease) for r, lease, _, _ in upstream.sent] == [("r1", "l2")]


def test_a_handshake_refusal_under_the_same_pin_records_nothing_forwarded() -> None:
    store = FakeLeaseStore()
    store.outcomes["r1"] = FakeLease("l1", binding=PIN)
    store.outcomes["r2"] = FakeVerificationError("upstream_unverified", "bad")
    svc, call = pinned_services(store), new_call()
    svc.upstream.answers["r1"] = GatewayError(  # type: ignore[union-attr]
        502, "binding_mismatch", "key differs", route_id="r1")
    with pytest.raises(GatewayError) as e:
        run(pipeline.route_and_forward(svc, call, request()))
    assert refusal(e) == (502, "binding_mismatch")
    assert call.attempts == ["r1:binding_mismatch"]
    assert call.forwarded_hash is None and call.provider_request_hash is None
    assert store.calls.count("invalidate:r1:l1") == 1  # re-verified once, not in a loop


# -- finish_json, seal_event, relay_stream -------------------------------------------


def served_call(svc: pipeline.Services, sealer: aci.Sealer | None = None) -> pipeline.Call:
    call = new_call()
    call.route, call.sealer = svc.router.by_id["r1"], sealer
    return call


ANSWER = {"id": "c1", "choices": [{"message": {"role": "assistant", "content": COMPLETION}}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_finish_json_records_usage_and_settle_charges_the_key() -> None:
    svc = services()
    call = served_call(svc)
    call.hold = run(svc.limiter.reserve(KEY, 100))
    data = json.dumps(ANSWER).encode()
    status, out, ctype = pipeline.finish_json(svc, call, reply(data, ctype="application/json"))
    assert (status, out, ctype) == (200, data, b"application/json")
    assert call.provider_response_hash == receipt.digest(SALT, data)
    assert call.usage == ANSWER["usage"]
    run(pipeline.settle(svc, call))
    run(pipeline.settle(svc, call))  # once only
    assert svc.limiter.used(KEY) == 8 and call.hold is None


def test_finish_json_malformed_json_is_a_502_naming_the_route_only() -> None:
    svc = services()
    call = served_call(svc)
    data = b'{"choices": "' + MARKER.encode()
    with pytest.raises(GatewayError) as e:
        pipeline.finish_json(svc, call, reply(data))
    assert refusal(e) == (502, "upstream_bad_response")
    assert "'r1'" in e.value.message and MARKER not in e.value.message
    assert call.provider_response_hash == receipt.digest(SALT, data)
    assert svc.limiter.used(KEY) == 0


def test_finish_json_seals_fields_under_e2ee() -> None:
    svc, sealer, opener = e2ee_parts()
    call = served_call(svc, sealer)
    status, out, ctype = pipeline.finish_json(svc, call, reply(json.dumps(ANSWER).encode(),
                                                               ctype="text/json"))
    assert (status, ctype) == (200, b"application/json")
    assert COMPLETION.encode() not in out
    assert opener.open_response(json.loads(out)) == ANSWER


def test_finish_json_passes_a_provider_error_but_withholds_it_from_an_e2ee_caller() -> None:
    svc = services()
    call = served_call(svc)
    echo = b'{"error": "bad: ' + MARKER.encode() + b'"}'
    status, out, ctype = pipeline.finish_json(svc, call, reply(echo, 400))
    assert (status, ctype) == (400, b"application/json")
    assert json.loads(out)["error"] == {"message": f"provider answered HTTP 400: bad: {MARKER}",
                                        "type": "upstream_error", "code": "upstream_rejected",
                                        "param": None}
    assert call.refusal == {"code": "upstream_rejected", "status": 400}
    svc, sealer, _ = e2ee_parts()
    call = served_call(svc, sealer)
    status, out, ctype = pipeline.finish_json(svc, call, reply(echo, 422))
    assert (status, ctype) == (422, b"application/json")
    assert json.loads(out)["error"]["code"] == "upstream_rejected"
    assert MARKER.encode() not in out
    assert call.provider_response_hash == receipt.digest(SALT, echo)


@pytest.mark.parametrize(("body", "want"), [
    (b'{"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",'
     b' "code": "context_length_exceeded"}}',
     {"message": "provider answered HTTP 400: too long", "type": "invalid_request_error",
      "param": "messages", "code": "context_length_exceeded"}),
    (b'{"error": {"message": "no", "type": "invalid_request_error", "code": null}}',
     {"message": "provider answered HTTP 400: no", "type": "invalid_request_error",
      "param": None, "code": "upstream_rejected"}),
    (b"<html><script>alert(1)</script></html>",
     {"message": "provider answered HTTP 400", "type": "upstream_error", "param": None,
      "code": "upstream_rejected"}),
    (b'{"error": {"code": "<script>", "message": 7}}',
     {"message": "provider answered HTTP 400", "type": "upstream_error", "param": None,
      "code": "upstream_rejected"}),
    (b"[1, 2]", {"message": "provider answered HTTP 400", "type": "upstream_error",
                 "param": None, "code": "upstream_rejected"}),
])
def test_a_provider_4xx_reaches_the_caller_as_json_with_a_code(body: bytes,
                                                               want: dict[str, object]) -> None:
    """What an OpenAI-style provider error says is kept; nothing else of the provider's
    answer (its bytes, its content type) is served as the gateway's."""
    svc = services()
    call = served_call(svc)
    status, out, ctype = pipeline.finish_json(svc, call, reply(body, 400, ctype="text/html"))
    assert (status, ctype, json.loads(out)) == (400, b"application/json", {"error": want})
    assert call.provider_response_hash == receipt.digest(SALT, body)  # the receipt: as sent


@pytest.mark.parametrize(("usage", "kept"), [
    ({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cost": 9},
     {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
    ({"total_tokens": True, "prompt_tokens": -1, "completion_tokens": 2.0}, None),
    ({"total_tokens": 2**53}, None),
    ({"total_tokens": "8"}, None),
    ([8], None),
    (None, None),
])
def test_usage_keeps_only_plausible_integer_counts(usage: Any, kept: Any) -> None:
    assert pipeline.usage_of(usage) == kept


def e2ee_parts() -> tuple[pipeline.Services, aci.Sealer, aci.Opener]:
    svc = services(e2ee_key=E2EE_SK.private_bytes_raw())
    req, hdrs, opener = sealed_chat()
    sealer = run(pipeline.open_e2ee(svc, new_call(), req, hdrs))
    assert sealer is not None
    start(opener, sealer)
    return svc, sealer, opener


def chunk_event(obj: Any) -> tuple[bytes, bytes]:
    payload = json.dumps(obj).encode()
    return b"data: " + payload + b"\n\n", payload


def event(raw: bytes) -> sse.Event:
    (ev,) = sse.SseParser().feed(raw)
    return ev


def test_relay_event_notes_usage_and_leaves_other_events_alone() -> None:
    call = new_call()
    ev, _ = chunk_event({"choices": [], "usage": {"total_tokens": 8}})
    assert pipeline.relay_event(call, event(ev)) == ev
    assert call.usage == {"total_tokens": 8}
    for raw in (b"not json", b"[1, 2]", b'"usage"'):
        assert pipeline.relay_event(call, event(b"data: " + raw + b"\n\n")) == \
            b"data: " + raw + b"\n\n"
    assert call.usage == {"total_tokens": 8}


def test_seal_event_seals_each_chunk_under_e2ee() -> None:
    _, sealer, opener = e2ee_parts()
    call = new_call()
    call.sealer = sealer
    chunk = {"choices": [{"index": 0, "delta": {"content": COMPLETION}}]}
    out = pipeline.relay_event(call, event(chunk_event(chunk)[0]))
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    assert COMPLETION.encode() not in out
    assert opener.open_response(json.loads(out[6:])) == chunk
    for raw in (b"event: note\ndata: {}\n\n", b"data: [1]\n\n", b"data: x\n\n"):
        out = pipeline.relay_event(call, event(raw))  # cannot be sealed: the stream ends
        assert json.loads(out[6:])["error"]["code"] == "e2ee_unsealable"
        assert call.refusal == {"code": "e2ee_unsealable", "status": 200}


class StreamReply:
    """A streamed reply yielding `parts`, then breaking if `broken`."""

    def __init__(self, parts: list[bytes], broken: bool = False) -> None:
        self.parts, self.broken = parts, broken
        self.status, self.content_type, self.body = 200, "text/event-stream", b""

    async def chunks(self) -> AsyncIterator[bytes]:
        for p in self.parts:
            yield p
        if self.broken:
            raise ProtocolError("connection lost")


def relay(svc: pipeline.Services, call: pipeline.Call,
          reply_: StreamReply) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    puts_at_send: list[int] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)
        puts_at_send.append(len(svc.outbox.puts))  # type: ignore[attr-defined]

    run(pipeline.relay_stream(svc, call, reply_, send))  # type: ignore[arg-type]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert puts_at_send[-1] == 1 and puts_at_send[-2] == 0  # committed before the last chunk
    return sent


def test_relay_stream_hashes_both_sides_and_commits_before_the_end() -> None:
    svc = services()
    call = served_call(svc)
    call.hold = run(svc.limiter.reserve(KEY, 100))  # settled with the usage, before commit
    ev1, _ = chunk_event({"choices": [{"delta": {"content": "a"}}]})
    ev2, _ = chunk_event({"choices": [], "usage": {"total_tokens": 4}})
    parts = [ev1[:7], ev1[7:] + ev2, b"data: [DONE]\n\n", b"data: tail"]
    sent = relay(svc, call, StreamReply(parts))
    relayed = b"".join(m.get("body", b"") for m in sent[1:])
    assert relayed == b"".join(parts)
    assert call.provider_response_hash == receipt.digest(SALT, b"".join(parts))
    assert call.usage == {"total_tokens": 4} and svc.limiter.used(KEY) == 4
    assert call.hold is None
    assert call.refusal is None
    signed = json.loads(svc.outbox.puts[0][2])  # type: ignore[attr-defined]
    assert signed["response_hash"] == receipt.digest(SALT, relayed)


def test_relay_stream_records_a_broken_stream() -> None:
    svc = services()
    call = served_call(svc)
    ev, _ = chunk_event({"choices": [{"delta": {"content": "a"}}]})
    relay(svc, call, StreamReply([ev], broken=True))
    assert call.refusal == {"code": "upstream_stream_broken", "status": 200}
    signed = json.loads(svc.outbox.puts[0][2])  # type: ignore[attr-defined]
    assert signed["refusal"] == call.refusal
    assert signed["response_hash"] == receipt.digest(SALT, ev)


def cut_stream(stopping: bool) -> tuple[pipeline.Services, pipeline.Call, bytes,
                                         list[dict[str, Any]]]:
    """A stream cancelled while a send waits on a client that stopped reading for good
    (as uvicorn: the bytes written, then a drain that never comes), the server `stopping`
    or not; (services, call, the event streamed twice, what was sent)."""
    svc = services()
    svc.status.stopping = stopping  # type: ignore[attr-defined]
    call = served_call(svc)
    call.status = 200
    ev, _ = chunk_event({"choices": [{"delta": {"content": "a"}}]})
    sent: list[dict[str, Any]] = []
    stuck = asyncio.Event()

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)
        if sum(bool(x.get("body")) for x in sent) > 1:
            stuck.set()
            await asyncio.Event().wait()

    async def go() -> None:
        task = asyncio.create_task(pipeline.relay_stream(
            svc, call, StreamReply([ev, ev]), send))  # type: ignore[arg-type]
        await stuck.wait()
        assert svc.outbox.puts == []  # type: ignore[attr-defined]
        task.cancel()
        for _ in range(100):
            await asyncio.sleep(0)
            if svc.outbox.puts or task.done():  # type: ignore[attr-defined]
                break
        task.cancel()  # the end's send waits on the client too
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(go())
    return svc, call, ev, sent


def test_relay_stream_cut_by_the_stop_commits_its_receipt_before_any_send() -> None:
    """The server, stopping, cancels a stream when the grace runs out, here while a send
    waits on a client that stopped reading: the receipt (refusal gateway_stopping, the
    hash covering the error event that ends the stream) is committed without waiting on
    that client again; the error event then goes with the stream's end."""
    svc, call, ev, sent = cut_stream(stopping=True)
    assert call.refusal == {"code": "gateway_stopping", "status": 200}
    signed = json.loads(svc.outbox.puts[0][2])  # type: ignore[attr-defined]
    assert signed["refusal"] == call.refusal
    end = sent[-1]
    assert end["more_body"] is False
    assert json.loads(end["body"].removeprefix(b"data: "))["error"]["code"] == "gateway_stopping"
    assert signed["response_hash"] == receipt.digest(SALT, ev + ev + end["body"])


def test_relay_stream_cancelled_otherwise_is_not_taken_for_the_stop() -> None:
    """A cancel while the server is not stopping is not absorbed as `gateway_stopping`."""
    svc, call, _, sent = cut_stream(stopping=False)
    assert call.refusal is None
    assert svc.outbox.puts == []  # type: ignore[attr-defined]
    assert all(m.get("more_body", True) for m in sent)  # the stream was not ended as cut


# -- receipt_body, commit_receipt, logged_in_time ------------------------------------


RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_receipt_body_of_a_served_call() -> None:
    svc = services()
    call = served_call(svc)
    call.lease = LeaseFacts(True, "dstack", "none", "l1", "2026-01-01T00:00:00Z", None)
    call.forwarded_hash = call.provider_request_hash = receipt.digest(SALT, b"fwd")
    call.provider_response_hash = receipt.digest(SALT, b"resp")
    call.upstream_status, call.usage = 200, {"total_tokens": 8}
    call.attempts = ["r0:upstream_timeout"]
    call.response_signature = "verified"
    body = pipeline.receipt_body(call, IDENTITY, KEYSET_INDEX, receipt.digest(SALT, b"out"))
    assert set(body) == set(receipt.REQUIRED) - {"signature"} | {
        "usage", "upstream_status", "failed_attempts"}
    assert body["v"] == receipt.VERSION and body["gateway"] == IDENTITY
    assert body["keyset_index"] == KEYSET_INDEX
    assert RFC3339_MS.fullmatch(body["time"])
    assert body["route"] == {"route_id": "r1", "model": "chat-model", "provider": "p-r1",
                             "upstream_model": "up-r1"}
    assert body["upstream"] == {"verified": True, "evidence": "dstack", "binding": "none",
                                "lease_id": "l1", "verified_at": "2026-01-01T00:00:00Z",
                                "response_signature": "verified"}
    assert body["failed_attempts"] == ["r0:upstream_timeout"]
    assert body["e2ee"] == {"mode": "none"}
    signed, entry = svc.signer.sign(body)
    assert receipt.verify(signed) == svc.signer.public_key
    assert entry == receipt.entry(signed)


def test_receipt_body_of_a_refused_call() -> None:
    call = new_call()
    call.refusal = {"code": "model_not_found", "status": 404}
    call.response_signature = "verified"  # without a lease it is not claimed
    body = pipeline.receipt_body(call, IDENTITY, KEYSET_INDEX, receipt.digest(SALT, b"err"))
    assert body["route"] == {}
    assert body["upstream"] == {"verified": False, "evidence": "none"}
    assert body["refusal"] == call.refusal
    assert body["forwarded_hash"] is None and body["provider_response_hash"] is None
    assert not {"usage", "upstream_status", "failed_attempts"} & set(body)
    call.route = route("r9", evidence="tinfoil")
    assert pipeline.receipt_body(call, IDENTITY, KEYSET_INDEX, "00" * 32)["upstream"] == {
        "verified": False, "evidence": "tinfoil"}


def test_commit_receipt_queues_the_signed_entry_without_content() -> None:
    svc = services()
    call = served_call(svc)
    run(pipeline.commit_receipt(svc, call, receipt.digest(SALT, COMPLETION.encode())))
    [(rid, rhash, entry)] = svc.outbox.puts  # type: ignore[attr-defined]
    assert (rid, rhash) == (call.receipt_id, call.request_hash)
    assert svc.outbox.owners == [KEY.sha256]  # type: ignore[attr-defined]
    signed = json.loads(entry)
    assert receipt.verify(signed) == svc.signer.public_key
    assert MARKER.encode() not in entry and COMPLETION.encode() not in entry


def test_logged_in_time_waits_only_when_policy_requires_it() -> None:
    assert run(pipeline.logged_in_time(loose := services(), new_call())) is True
    assert loose.status.waits == []  # type: ignore[attr-defined]
    strict = services(require_log_inclusion=True, log_wait_timeout=0.25)
    call = new_call()
    assert run(pipeline.logged_in_time(strict, call)) is True
    strict.status.logged = False  # type: ignore[attr-defined]
    assert run(pipeline.logged_in_time(strict, call)) is False
    assert strict.status.waits == [(call.receipt_id, 0.25)] * 2  # type: ignore[attr-defined]
    call.refusal = {"code": "upstream_rejected", "status": 400}  # a refusal is not held
    assert run(pipeline.logged_in_time(strict, call)) is True
    strict.status.enabled = False  # no log configured: nothing to wait for
    assert run(pipeline.logged_in_time(strict, new_call())) is True
    assert len(strict.status.waits) == 2  # type: ignore[attr-defined]


# -- the sequence ----------------------------------------------------------------------


def call_app(svc: pipeline.Services, raw: bytes, *headers: tuple[bytes, bytes]
             ) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    run(pipeline.model_call(svc, scope(*headers), Messages(body(raw)), send, "chat"))
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def test_an_unauthenticated_call_gets_no_receipt_but_its_hash() -> None:
    svc = services()
    raw = json.dumps(CHAT).encode()
    salt = b"ab" * 32
    status, hdrs, _ = call_app(svc, raw, (b"x-receipt-salt", salt))
    assert status == 401
    assert hdrs[b"x-request-hash"] == receipt.digest(bytes.fromhex(salt.decode()), raw).encode()
    assert b"x-receipt-id" not in hdrs
    assert svc.outbox.puts == [] and svc.upstream.sent == []  # type: ignore[union-attr]


@pytest.mark.parametrize("code", ["outbox_full", "outbox_unavailable"])
def test_a_call_whose_receipt_cannot_be_kept_is_refused_before_anything_is_sent(
        code: str) -> None:
    svc = services()
    svc.outbox.refusal = code  # type: ignore[attr-defined]
    with pytest.raises(GatewayError) as e:
        call_app(svc, json.dumps(CHAT).encode(), (b"authorization", AUTH))
    assert (e.value.status, e.value.code) == (503, code)
    assert svc.outbox.puts == [] and svc.upstream.sent == []  # type: ignore[union-attr]


def test_a_refused_call_is_receipted_and_sends_nothing() -> None:
    store = FakeLeaseStore()
    for rid in ("r1", "r2"):
        store.outcomes[rid] = FakeVerificationError("upstream_unverified", "bad")
    svc = services(store=store)
    status, hdrs, out = call_app(svc, json.dumps(CHAT).encode(), (b"authorization", AUTH))
    assert status == 502 and json.loads(out)["error"]["code"] == "upstream_unverified"
    [(rid, _, entry)] = svc.outbox.puts  # type: ignore[attr-defined]
    assert hdrs[b"x-receipt-id"] == rid.encode()
    signed = json.loads(entry)
    assert signed["refusal"] == {"code": "upstream_unverified", "status": 502}
    assert signed["route"]["route_id"] == "r1"  # the refusing route is named
    assert svc.upstream.sent == []  # type: ignore[union-attr]


def test_a_bad_request_takes_its_rate_token() -> None:
    key = ApiKey("one-a-minute", hash_key(API_KEY), requests_per_minute=1)
    svc = services(key=key)
    auth = (b"authorization", AUTH)
    status, _, out = call_app(svc, b"{not json", auth)
    assert (status, json.loads(out)["error"]["code"]) == (400, "invalid_json")
    status, _, out = call_app(svc, json.dumps(CHAT).encode(), auth)  # the token is gone
    assert (status, json.loads(out)["error"]["code"]) == (429, "rate_limit_exceeded")
    assert len(svc.outbox.puts) == 2 and svc.upstream.sent == []  # type: ignore[union-attr,attr-defined]


def test_a_call_refused_after_its_reservation_releases_it() -> None:
    key = ApiKey("budget", hash_key(API_KEY), token_budget=10**6)
    svc = services(key=key, log_unavailable="refuse")
    svc.status.log_down = True  # refused once admitted and reserved
    status, _, out = call_app(svc, json.dumps(CHAT).encode(), (b"authorization", AUTH))
    assert (status, json.loads(out)["error"]["code"]) == (503, "log_unavailable")
    assert svc.upstream.sent == []  # type: ignore[union-attr]
    assert run(svc.limiter.reserve(key, 10**6)).tokens == 10**6  # nothing left held
    assert svc.limiter.used(key) == 0  # type: ignore[attr-defined]
