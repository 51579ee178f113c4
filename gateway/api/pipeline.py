"""One model call as a sequence of named steps.

    read the body → authenticate → admit → parse → open E2EE
      → for each candidate route, in priority order:
            acquire its lease → forward (re-verify once if the key rotated)
            → check the response signature (signature-bound leases only)
      → seal the answer (the JSON body, or each SSE event)
      → sign the receipt and queue it → respond

`model_call` is that sequence and nothing else; each step is a function of
what the earlier ones produced, so each can be tested alone. A `Call`
gathers what the receipt records; `Services` holds what the steps use.

Invariants:
- No byte goes upstream unless the route's lease satisfies its policy (the
  lease is acquired first; a TLS pin is checked on the handshake).
- Everything after authentication gets a receipt, refusals included; it is
  committed to the outbox before the response completes (before the last
  chunk of a stream).
- Prompt and completion text never reach a receipt, a log line or an error
  message; only hashes, routes, codes and usage counts do.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from gateway.api.apikeys import KeyStore
from gateway.api.config import ApiKey, Config, RouteSpec
from gateway.api.errors import GatewayError, bad_request, refused, unauthorized
from gateway.api.ratelimit import Limiter
from gateway.api.router import Router
from gateway.api.routes import RouteBook, now_rfc3339
from gateway.receipts.outbox import Outbox, ReceiptSigner
from gateway.receipts.shipper import LogStatus
from gateway.upstream.client import ProtocolError, Upstream, UpstreamReply
from gateway.upstream.leases import LeaseFacts
from gateway.verification.base import SIGNATURE_BINDING
from tlog.service import Receive, Scope, Send, respond
from verifier import aci, receipt

log = logging.getLogger("gateway")

JSON = b"application/json"
RESPONSE_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
UPSTREAM_PATH = {"chat": "/chat/completions", "embeddings": "/embeddings"}
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
Headers = list[tuple[bytes, bytes]]


@dataclass
class Services:
    """What the steps of a model call use (built once by the app)."""

    cfg: Config
    keys: KeyStore
    limiter: Limiter
    router: Router
    routes: RouteBook
    signer: ReceiptSigner
    outbox: Outbox
    status: LogStatus
    identity: dict[str, str]
    e2ee_key: bytes | None = None
    upstream: Upstream | None = None
    signatures: httpx.AsyncClient | None = None


@dataclass
class Request:
    """A parsed, validated request body (after E2EE fields are opened: plaintext)."""

    obj: dict[str, Any]
    model: str
    stream: bool


@dataclass
class Call:
    """What one model call accumulates for its receipt."""

    receipt_id: str
    salt: bytes
    request_hash: str
    kind: str
    key: ApiKey
    e2ee_mode: str = "none"
    route: RouteSpec | None = None
    lease: LeaseFacts | None = None
    forwarded_hash: str | None = None
    provider_request_hash: str | None = None
    provider_response_hash: str | None = None
    upstream_status: int | None = None
    usage: dict[str, int] | None = None
    refusal: dict[str, Any] | None = None
    attempts: list[str] = field(default_factory=list)
    response_signature: str | None = None
    sealer: aci.Sealer | None = None

    def headers(self) -> Headers:
        """The response headers every answer to this call carries."""
        h = [(b"x-request-hash", self.request_hash.encode()),
             (b"x-receipt-id", self.receipt_id.encode()),
             (b"x-receipt-salt", self.salt.hex().encode())]
        if self.sealer is not None:
            h += self.sealer.headers()
        return h


# -- the sequence --------------------------------------------------------------------


async def model_call(svc: Services, scope: Scope, receive: Receive, send: Send,
                     kind: str) -> None:
    """Serve one chat or embeddings call (the module docstring's sequence)."""
    body = await read_body(scope, receive, svc.cfg.gateway.max_body_bytes)
    hdrs = dict(scope["headers"])
    salt = receipt_salt(hdrs)
    request_hash = receipt.digest(salt, body)
    try:
        key = authenticate(svc.keys, hdrs)
    except GatewayError as e:
        await respond(send, e.status, e.body(), JSON,
                      headers=[(b"x-request-hash", request_hash.encode()),
                               (b"x-receipt-salt", salt.hex().encode())])
        return
    call = Call(secrets.token_hex(16), salt, request_hash, kind, key)
    try:
        admit(svc, key)
        req = parse(body, kind, svc.cfg.gateway.max_messages, svc.cfg.gateway.max_json_depth)
        call.sealer = open_e2ee(svc, call, req, hdrs)
        reply = await route_and_forward(svc, call, req)
        if reply.streaming:
            await relay_stream(svc, call, reply, send)
            return  # the receipt was committed before the stream ended
        status, out, ctype = finish_json(svc, call, reply)
    except GatewayError as e:
        call.refusal = {"code": e.code, "status": e.status}
        if e.route_id is not None and call.route is None:
            call.route = svc.router.by_id.get(e.route_id)
        status, out, ctype = e.status, e.body(), JSON
        log.info("refused %s: %s (route %s)", request_hash, e.code, e.route_id or "-")
    await commit_receipt(svc, call, receipt.digest(call.salt, out))
    if not await logged_in_time(svc, call):
        err = refused(503, "log_unavailable",
                      "the receipt could not be logged in time; it stays queued")
        status, out, ctype = err.status, err.body(), JSON
    await respond(send, status, out, ctype, headers=call.headers())


# -- the steps -----------------------------------------------------------------------


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The exact request body bytes; 413 past `limit`, 400 on a malformed length."""
    for k, v in scope["headers"]:
        if k == b"content-length":
            if not v.isdigit():
                raise bad_request("invalid_request", "malformed Content-Length")
            if int(v) > limit:
                raise GatewayError(413, "request_too_large",
                                   f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise GatewayError(400, "client_disconnected", "client went away")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, "request_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def receipt_salt(hdrs: dict[bytes, bytes]) -> bytes:
    """The caller's `x-receipt-salt` (64 hex), or a fresh one; 400 if malformed."""
    given = hdrs.get(b"x-receipt-salt")
    if given is None:
        return receipt.new_salt()
    try:
        return receipt.parse_salt(given.decode("latin-1"))
    except receipt.ReceiptError:
        raise bad_request("invalid_receipt_salt",
                          "x-receipt-salt must be 64 hex digits (32 bytes)") from None


def authenticate(keys: KeyStore, hdrs: dict[bytes, bytes]) -> ApiKey:
    """The caller's API key (`Authorization: Bearer`), or 401."""
    key = keys.lookup(hdrs.get(b"authorization"))
    if key is None:
        raise unauthorized()
    return key


def admit(svc: Services, key: ApiKey) -> None:
    """429 over the key's rate or budget; 503 if policy refuses to serve while the log is down."""
    err = svc.limiter.admit(key, time.monotonic())
    if err is not None:
        raise err
    if svc.cfg.gateway.log_unavailable == "refuse" and svc.status.log_down:
        raise refused(503, "log_unavailable",
                      "the receipt log is unreachable and policy refuses to serve")


def parse(body: bytes, kind: str, max_messages: int = 2048, max_depth: int = 64) -> Request:
    """The request body as a validated `Request`, else a 400: at most `max_depth` nested
    arrays and objects (the forwarded body is re-encoded, which orjson does to 254 levels
    only) and at most `max_messages` chat messages."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("invalid_json", "request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise bad_request("invalid_request", "request body must be a JSON object")
    if nesting_exceeds(obj, max_depth):
        raise bad_request("json_too_deep", f"request JSON nests deeper than {max_depth} levels")
    model = obj.get("model")
    if model is None:
        raise bad_request("missing_required_parameter", "'model' is required", "model")
    if not isinstance(model, str) or not model:
        raise bad_request("invalid_type", "'model' must be a non-empty string", "model")
    stream = obj.get("stream", False)
    if kind == "chat":
        msgs = obj.get("messages")
        if msgs is None:
            raise bad_request("missing_required_parameter", "'messages' is required", "messages")
        if isinstance(msgs, list) and len(msgs) > max_messages:
            raise bad_request("too_many_messages", f"more than {max_messages} messages",
                              "messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise bad_request("invalid_type", "'messages' must be a non-empty array of "
                              "message objects with a string 'role'", "messages")
        if not isinstance(stream, bool):
            raise bad_request("invalid_type", "'stream' must be a boolean", "stream")
        so = obj.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise bad_request("invalid_type", "'stream_options' must be an object",
                              "stream_options")
    else:
        inp = obj.get("input")
        if inp is None:
            raise bad_request("missing_required_parameter", "'input' is required", "input")
        if not (isinstance(inp, str) or (isinstance(inp, list) and inp)):
            raise bad_request("invalid_type", "'input' must be a string or a non-empty array",
                              "input")
        if stream is not False:
            raise bad_request("invalid_type", "embeddings do not stream", "stream")
        stream = False
    return Request(obj, model, stream)


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep in `value` (iterative,
    linear in its size)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def open_e2ee(svc: Services, call: Call, req: Request,
              hdrs: dict[bytes, bytes]) -> aci.Sealer | None:
    """Open the sealed fields of an ACI E2EE request in place; its response sealer.

    A request without E2EE headers passes unchanged (None)."""
    mode = hdrs.get(b"x-e2ee")
    if mode is None:
        return None
    if svc.e2ee_key is None:
        raise bad_request("e2ee_unavailable", "this gateway has no E2EE key")
    try:
        req.obj, sealer = aci.open_request(
            req.obj, call.kind, mode.decode("latin-1"),
            hdrs.get(b"x-e2ee-client-key", b"").decode("latin-1"),
            hdrs.get(b"x-e2ee-enc", b"").decode("latin-1"), svc.e2ee_key)
    except aci.AciError as e:
        raise bad_request("e2ee_invalid", f"E2EE request rejected: {e}") from None
    call.e2ee_mode = aci.MODE
    return sealer


async def route_and_forward(svc: Services, call: Call, req: Request) -> UpstreamReply:
    """The provider's reply through the first candidate route whose lease holds and whose
    provider answers; each refused route is tried no further and the next is tried."""
    routes = svc.router.candidates(req.model, call.kind)
    if not routes:
        raise GatewayError(404, "model_not_found",
                           f"model {req.model[:64]!r} is not served here"
                           + (" on this endpoint" if svc.router.knows(req.model) else ""),
                           param="model")
    refusals: list[GatewayError] = []
    for route in routes:
        try:
            lease = await svc.routes.acquire(route)
        except GatewayError as e:
            refusals.append(e)
            continue
        signed_only = lease.binding.startswith(SIGNATURE_BINDING)
        if signed_only and req.stream:
            refusals.append(refused(
                502, "binding_mismatch", f"route {route.id!r} refused: its lease binds only a "
                "response-signing key, so a stream could not be verified before delivery",
                route_id=route.id))
            continue
        call.route, call.lease = route, lease
        fwd = dict(req.obj)
        fwd["model"] = route.upstream_model
        fwd_bytes = orjson.dumps(fwd)
        call.forwarded_hash = call.provider_request_hash = receipt.digest(call.salt, fwd_bytes)
        try:
            reply = await forward(svc, call, route, lease, fwd_bytes, req.stream)
            if signed_only and reply.status == 200:
                await check_response_signature(svc, call, fwd_bytes, reply)
        except GatewayError as e:
            call.attempts.append(f"{route.id}:{e.code}")
            if e.code == "binding_mismatch":  # refused on the handshake: nothing forwarded
                call.forwarded_hash = call.provider_request_hash = None
            refusals.append(e)
            continue
        call.upstream_status = reply.status
        return reply
    first = next((e for e in refusals if e.status == 504 or e.code.startswith("upstream_")
                  and e.code not in ("upstream_unverified",)), refusals[0])
    detail = "; ".join(e.message for e in refusals)
    raise GatewayError(first.status, first.code, f"no usable route for model "
                       f"{req.model[:64]!r}: {detail}", type_=first.type, route_id=first.route_id)


async def forward(svc: Services, call: Call, route: RouteSpec, lease: LeaseFacts, body: bytes,
                  stream: bool) -> UpstreamReply:
    """Send under the lease; if the provider's TLS key no longer matches it (a key
    rotation, or an impostor), re-verify once and retry once under the new lease.
    The refused handshake sent no byte; a failed re-verification refuses the call."""
    assert svc.upstream is not None
    path = UPSTREAM_PATH[call.kind]
    try:
        return await svc.upstream.send(route, lease, path, body, stream)
    except GatewayError as e:
        if e.code != "binding_mismatch" or lease.pin is None:
            raise
        first = e
    log.info("route %s: provider key differs from lease %s; re-verifying once",
             route.id, lease.lease_id)
    await svc.routes.leases.invalidate(route, lease)
    fresh = await svc.routes.acquire(route)
    if fresh.pin == lease.pin:
        raise first
    call.lease = fresh
    call.attempts.append(f"{route.id}:binding_mismatch")
    return await svc.upstream.send(route, fresh, path, body, stream)


async def check_response_signature(svc: Services, call: Call, forwarded: bytes,
                                   reply: UpstreamReply) -> None:
    """For a lease bound to a signing key (vllm-proxy style): the provider's signature over
    `sha256(forwarded request):sha256(response)` must recover to the attested address, or
    the response is withheld (`response_signature_invalid`)."""
    from gateway.verification import phala

    route, lease = call.route, call.lease
    assert route is not None and lease is not None and svc.signatures is not None
    address = lease.binding.removeprefix(SIGNATURE_BINDING)
    try:
        chat_id = orjson.loads(reply.body)["id"]
        if not isinstance(chat_id, str) or not RESPONSE_ID.fullmatch(chat_id):
            raise ValueError("no usable response id")
        sig = await phala.fetch_signature(svc.signatures, route, chat_id)
        text, signature = sig["text"], sig["signature"]
        if not isinstance(text, str) or not isinstance(signature, str):
            raise ValueError("signature document without text and signature")
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError, httpx.HTTPError) as e:
        raise refused(502, "response_signature_invalid", f"route {route.id!r}: no valid "
                      f"response signature: {type(e).__name__}", route_id=route.id) from None
    want = f"{hashlib.sha256(forwarded).hexdigest()}:{hashlib.sha256(reply.body).hexdigest()}"
    if not (hmac.compare_digest(text, want)
            and phala.verify_response_signature(text, signature, address)):
        raise refused(502, "response_signature_invalid", f"route {route.id!r}: the response "
                      "is not signed by the attested key over these exact bytes",
                      route_id=route.id)
    call.response_signature = "verified"


def usage_of(obj: Any) -> dict[str, int] | None:
    """Integer token counts from an OpenAI `usage` object (nothing else is kept)."""
    if not isinstance(obj, dict):
        return None
    out = {k: v for k in USAGE_KEYS if isinstance(v := obj.get(k), int)
           and not isinstance(v, bool) and 0 <= v < 2**53}
    return out or None


def finish_json(svc: Services, call: Call, reply: UpstreamReply) -> tuple[int, bytes, bytes]:
    """(status, body, content type) of a whole (non-streamed) reply: usage charged, fields
    sealed under E2EE, a provider's error text withheld from an E2EE caller."""
    data = reply.body
    call.provider_response_hash = receipt.digest(call.salt, data)
    ctype = reply.content_type.encode("latin-1")
    if reply.status == 200:
        try:
            resp = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise refused(502, "upstream_bad_response",
                          f"route {call.route.id!r}: provider sent malformed JSON"
                          if call.route else "provider sent malformed JSON") from None
        if isinstance(resp, dict):
            call.usage = usage_of(resp.get("usage"))
            if call.sealer is not None:
                data = orjson.dumps(call.sealer.seal_response(resp))
                ctype = JSON
    elif reply.status >= 400:
        call.refusal = {"code": "upstream_rejected", "status": reply.status}
        if call.sealer is not None:  # the provider's text could echo content: not in clear
            err = GatewayError(reply.status, "upstream_rejected",
                               f"provider rejected the request with HTTP {reply.status}",
                               type_="upstream_error")
            return reply.status, err.body(), JSON
    if call.usage:
        svc.limiter.charge(call.key, call.usage.get("total_tokens", 0))
    return reply.status, data, ctype


async def relay_stream(svc: Services, call: Call, reply: UpstreamReply, send: Send) -> None:
    """Relay an SSE stream event by event (sealed under E2EE), then commit the receipt
    before the final empty chunk; a broken upstream stream ends it and is recorded."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
        *call.headers()]})
    prov = receipt.digester(call.salt)
    resp = receipt.digester(call.salt)
    events = aci.SseSplitter()
    try:
        async for chunk in reply.chunks():
            prov.update(chunk)
            out = b""
            for ev in events.feed(chunk):
                payload = aci.sse_data(ev)
                if payload is not None and payload != b"[DONE]" and (
                        call.sealer is not None or b'"usage"' in payload):
                    out += seal_event(call, ev, payload)
                else:
                    out += ev
            if out:
                resp.update(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
        rest = events.rest()
        if rest:
            resp.update(rest)
            await send({"type": "http.response.body", "body": rest, "more_body": True})
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as e:
        call.refusal = {"code": "upstream_stream_broken", "status": 200}
        log.warning("stream broken %s: %s", call.request_hash, type(e).__name__)
    call.provider_response_hash = prov.hexdigest()
    if call.usage:
        svc.limiter.charge(call.key, call.usage.get("total_tokens", 0))
    await commit_receipt(svc, call, resp.hexdigest())
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def seal_event(call: Call, ev: bytes, payload: bytes) -> bytes:
    """One SSE event as relayed: usage noted, fields sealed under E2EE."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return ev
    if not isinstance(obj, dict):
        return ev
    u = usage_of(obj.get("usage"))
    if u:
        call.usage = u
    if call.sealer is None:
        return ev
    return b"data: " + orjson.dumps(call.sealer.seal_response(obj)) + b"\n\n"


def receipt_body(call: Call, identity: dict[str, str], response_hash: str) -> dict[str, Any]:
    """The unsigned receipt of a call (docs/receipts.md)."""
    route = call.route
    body: dict[str, Any] = {
        "v": receipt.VERSION, "id": call.receipt_id, "time": now_rfc3339(),
        "gateway": identity, "request_hash": call.request_hash,
        "forwarded_hash": call.forwarded_hash,
        "route": {"route_id": route.id, "model": route.model, "provider": route.provider,
                  "upstream_model": route.upstream_model} if route else {},
        "upstream": call.lease.receipt() if call.lease else {
            "verified": False, "evidence": route.evidence if route else "none"},
        "provider_request_hash": call.provider_request_hash,
        "provider_response_hash": call.provider_response_hash,
        "response_hash": response_hash, "e2ee": {"mode": call.e2ee_mode},
    }
    if call.usage:
        body["usage"] = call.usage
    if call.refusal:
        body["refusal"] = call.refusal
    if call.upstream_status is not None:
        body["upstream_status"] = call.upstream_status
    if call.attempts:
        body["failed_attempts"] = call.attempts
    if call.response_signature is not None and call.lease is not None:
        body["upstream"]["response_signature"] = call.response_signature
    return body


async def commit_receipt(svc: Services, call: Call, response_hash: str) -> None:
    """Sign the call's receipt and commit it to the outbox (the shipper picks it up)."""
    _, entry = svc.signer.sign(receipt_body(call, svc.identity, response_hash))
    await svc.outbox.put(call.receipt_id, call.request_hash, entry)


async def logged_in_time(svc: Services, call: Call) -> bool:
    """False only if policy requires inclusion before answering and it did not come in time."""
    g = svc.cfg.gateway
    if not (g.require_log_inclusion and svc.status.enabled and call.refusal is None):
        return True
    return await svc.status.wait_logged(call.receipt_id, g.log_wait_timeout)
