"""The gateway's ASGI application (raw ASGI on the hot path).

Per model call: read the body (413 past the limit), hash it (request_hash),
authenticate (401), admit (429 rate/budget), refuse if policy demands a
reachable log (503), parse and validate (400/404), open ACI E2EE fields, then
walk the model's routes in priority order: a route is used only once its lease
satisfies policy, and no byte goes upstream otherwise. The response returns
the provider's bytes (re-sealed under E2EE); the signed receipt is committed to
the outbox before the response completes. Everything after authentication
gets a receipt, refusals included.

Invariant: prompt and completion text never reach a receipt, a log line or an
error message; only hashes, routes, codes and usage counts do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from gateway.api.apikeys import KeyStore, admin_ok
from gateway.api.config import ApiKey, Config, RouteSpec
from gateway.api.errors import GatewayError, bad_request, refused, unauthorized
from gateway.api.ratelimit import Limiter
from gateway.api.router import Router
from gateway.receipts.outbox import Outbox, ReceiptSigner
from gateway.receipts.shipper import LogStatus
from gateway.upstream.client import ProtocolError, Upstream, UpstreamReply
from gateway.upstream.leases import LeaseFacts, Leases
from gateway.verification.base import SIGNATURE_BINDING
from verifier import aci

log = logging.getLogger("gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Attest = Callable[[str | None], Awaitable[dict[str, Any]]]

HEX64 = re.compile(r"[0-9a-f]{64}")
RECEIPT_ID = re.compile(r"[0-9a-f]{32}")
RESPONSE_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
NONCE = re.compile(r"(?:[0-9a-fA-F]{2}){1,64}")
JSON = b"application/json"
PATHS = {b"/v1/chat/completions": "chat", b"/v1/embeddings": "embeddings"}
UPSTREAM_PATH = {"chat": "/chat/completions", "embeddings": "/embeddings"}
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


_second: list[Any] = [-1, ""]


def now_rfc3339(t: float | None = None) -> str:
    """UTC time `t` (default now) as RFC 3339 with milliseconds; the date part is cached."""
    t = time.time() if t is None else t
    sec = int(t)
    if sec != _second[0]:
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{int((t - sec) * 1000):03d}Z"


def _usage(obj: Any) -> dict[str, int] | None:
    """Integer token counts from an OpenAI `usage` object (nothing else is kept)."""
    if not isinstance(obj, dict):
        return None
    out = {k: v for k in USAGE_KEYS if isinstance(v := obj.get(k), int)
           and not isinstance(v, bool) and 0 <= v < 2**53}
    return out or None


def _validate(obj: Any, kind: str) -> tuple[str, bool]:
    """(model, stream) of a well-formed request body, else a 400."""
    if not isinstance(obj, dict):
        raise bad_request("invalid_request", "request body must be a JSON object")
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
    return model, stream


@dataclass
class Call:
    """What one model call accumulates for its receipt."""

    receipt_id: str
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


@dataclass
class RouteState:
    """Last verification outcome per route, for GET /v1/routes."""

    state: str = "unknown"
    lease_id: str | None = None
    verified_at: str | None = None
    expires_at: str | None = None
    last_error: str | None = None
    checked_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class Gateway:
    """The ASGI app; `startup`/`shutdown` run from the ASGI lifespan protocol."""

    def __init__(self, cfg: Config, *, signer: ReceiptSigner, identity: dict[str, str],
                 outbox: Outbox, status: LogStatus, leases: Leases, attest: Attest,
                 e2ee_key: bytes | None = None) -> None:
        self.cfg = cfg
        self.signer = signer
        self.identity = identity
        self.outbox = outbox
        self.status = status
        self.leases = leases
        self.attest = attest
        self.e2ee_key = e2ee_key
        self.router = Router(cfg.routes)
        self.keys = KeyStore(cfg.api_keys)
        self.limiter = Limiter()
        self.upstream: Upstream | None = None
        self.signatures: httpx.AsyncClient | None = None
        self.route_state = {r.id: RouteState() for r in cfg.routes}
        self._max_body = cfg.gateway.max_body_bytes
        self._models_body = orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "pag"}
            for m in self.router.models()]})

    async def startup(self) -> None:
        """Open the upstream pool and start shipping queued receipts."""
        self.upstream = Upstream()
        if any(r.evidence == "phala" for r in self.cfg.routes):
            self.signatures = httpx.AsyncClient()  # CA-verified: it may carry the route's key
        await self.status.start()

    async def shutdown(self) -> None:
        """Close the pool and stop following the ledger."""
        if self.upstream is not None:
            await self.upstream.close()
        if self.signatures is not None:
            await self.signatures.aclose()
        await self.status.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        typ = scope["type"]
        if typ == "http":
            await self._http(scope, receive, send)
        elif typ == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": repr(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- plumbing -------------------------------------------------------------

    @staticmethod
    async def _respond(send: Send, status: int, body: bytes,
                       headers: list[tuple[bytes, bytes]] | None = None,
                       ctype: bytes = JSON) -> None:
        h = [(b"content-type", ctype), (b"content-length", b"%d" % len(body))]
        if headers:
            h += headers
        await send({"type": "http.response.start", "status": status, "headers": h})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send: Send, err: GatewayError,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self._respond(send, err.status, err.body(), headers)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for k, v in scope["headers"]:
            if k == b"content-length":
                if not v.isdigit():
                    raise bad_request("invalid_request", "malformed Content-Length")
                if int(v) > self._max_body:
                    raise GatewayError(413, "request_too_large",
                                       f"request body exceeds {self._max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise GatewayError(400, "client_disconnected", "client went away")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise GatewayError(413, "request_too_large",
                                   f"request body exceeds {self._max_body} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        kind = PATHS.get(path.encode())
        try:
            if kind is not None:
                if method != "POST":
                    raise GatewayError(405, "method_not_allowed", "use POST")
                await self._model_call(scope, receive, send, kind)
            elif method != "GET":
                raise GatewayError(405 if self._known_get(path) else 404,
                                   "method_not_allowed" if self._known_get(path) else "not_found",
                                   "use GET" if self._known_get(path) else "no such endpoint")
            elif path == "/v1/models":
                await self._respond(send, 200, self._models_body)
            elif path == "/.well-known/attestation":
                await self._attestation(scope, send)
            elif path.startswith("/v1/receipts/"):
                await self._receipt(path[len("/v1/receipts/"):], send)
            elif path == "/v1/routes":
                await self._routes(scope, send)
            elif path == "/healthz":
                await self._health(send)
            else:
                raise GatewayError(404, "not_found", "no such endpoint")
        except GatewayError as e:
            await self._error(send, e)

    @staticmethod
    def _known_get(path: str) -> bool:
        return path in ("/v1/models", "/.well-known/attestation", "/v1/routes", "/healthz") \
            or path.startswith("/v1/receipts/")

    # -- read-only endpoints ----------------------------------------------------

    async def _attestation(self, scope: Scope, send: Send) -> None:
        nonce: str | None = None
        qs = scope.get("query_string", b"").decode("latin-1")
        for part in qs.split("&"):
            k, _, v = part.partition("=")
            if k == "nonce":
                if not NONCE.fullmatch(v):
                    raise bad_request("invalid_nonce", "nonce must be 1 to 64 bytes of hex",
                                      "nonce")
                nonce = v.lower()
        doc = await self.attest(nonce)
        await self._respond(send, 200, orjson.dumps(doc), [(b"cache-control", b"no-store")])

    async def _receipt(self, rest: str, send: Send) -> None:
        if rest.startswith("by-request-hash/"):
            h = rest[len("by-request-hash/"):]
            if not HEX64.fullmatch(h):
                raise bad_request("invalid_request_hash",
                                  "request hash must be lower-case hex SHA-256")
            row = self.outbox.by_request_hash(h)
        else:
            if not RECEIPT_ID.fullmatch(rest):
                raise GatewayError(404, "receipt_not_found", "no such receipt")
            row = self.outbox.get(rest)
        if row is None:
            raise GatewayError(404, "receipt_not_found", "no such receipt")
        body = b'{"receipt":' + row.entry + b',"proof":' + orjson.dumps(row.proof) + \
            b',"index":' + orjson.dumps(row.log_index) + b"}"
        await self._respond(send, 200, body)

    async def _routes(self, scope: Scope, send: Send) -> None:
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if not admin_ok(auth, self.cfg.gateway.admin_key_sha256):
            raise GatewayError(401, "invalid_admin_key", "admin key required",
                               type_="authentication_error")
        out = []
        for r in self.cfg.routes:
            with contextlib.suppress(GatewayError):
                await self._acquire(r)
            st = self.route_state[r.id]
            out.append({"id": r.id, "model": r.model, "aliases": list(r.aliases),
                        "provider": r.provider, "evidence": r.evidence, "kind": r.kind,
                        "priority": r.priority, "state": st.state, "lease_id": st.lease_id,
                        "verified_at": st.verified_at, "lease_expires_at": st.expires_at,
                        "last_error": st.last_error, "facts": st.notes, "checked_at": now_rfc3339(st.checked_at) if st.checked_at else None})
        total, pending = self.outbox.counts()
        await self._respond(send, 200, orjson.dumps({
            "routes": out, "receipts": total, "unlogged": pending,
            "log_down": self.status.log_down, "log_last_error": self.status.last_error}))

    async def _health(self, send: Send) -> None:
        await self._respond(send, 200, orjson.dumps({"ok": True,
                                                     "log_down": self.status.log_down}))

    # -- model calls -------------------------------------------------------------

    async def _acquire(self, route: RouteSpec) -> LeaseFacts:
        st = self.route_state[route.id]
        st.checked_at = now = time.time()
        try:
            facts = await self.leases.acquire(route, now)
        except GatewayError as e:
            st.state, st.last_error = "refused", f"{e.code}: {e.message}"
            raise
        st.state = "verified" if facts.verified else "unverified-allowed"
        st.lease_id, st.verified_at, st.expires_at = (facts.lease_id, facts.verified_at,
                                                      facts.expires_at)
        st.notes = facts.notes
        return facts

    async def _model_call(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        body = await self._read_body(scope, receive)
        request_hash = hashlib.sha256(body).hexdigest()
        hdrs = {k: v for k, v in scope["headers"]}
        key = self.keys.lookup(hdrs.get(b"authorization"))
        if key is None:
            await self._error(send, unauthorized(), [(b"x-request-hash", request_hash.encode())])
            return
        call = Call(secrets.token_hex(16), request_hash, kind, key)
        try:
            status, out, ctype = await self._serve(call, body, hdrs, send)
        except GatewayError as e:
            call.refusal = {"code": e.code, "status": e.status}
            if e.route_id is not None and call.route is None:
                call.route = self.router.by_id.get(e.route_id)
            status, out, ctype = e.status, e.body(), JSON
            log.info("refused %s: %s (route %s)", request_hash, e.code, e.route_id or "-")
        if status is None:
            return  # streamed: the receipt was written before the stream ended
        await self._commit(call, hashlib.sha256(out).hexdigest())
        wait = self.cfg.gateway.require_log_inclusion and self.status.enabled \
            and call.refusal is None
        if wait and not await self.status.wait_logged(call.receipt_id,
                                                       self.cfg.gateway.log_wait_timeout):
            err = refused(503, "log_unavailable",
                          "the receipt could not be logged in time; it stays queued")
            status, out, ctype = err.status, err.body(), JSON
        await self._respond(send, status, out, self._headers(call), ctype)

    def _headers(self, call: Call) -> list[tuple[bytes, bytes]]:
        h = [(b"x-request-hash", call.request_hash.encode()),
             (b"x-receipt-id", call.receipt_id.encode())]
        if call.sealer is not None:
            h += call.sealer.headers()
        return h

    async def _serve(self, call: Call, body: bytes, hdrs: dict[bytes, bytes],
                     send: Send) -> tuple[Any, bytes, bytes]:
        """(status, body, content type) to answer with; status None once streamed."""
        now = time.monotonic()
        err = self.limiter.admit(call.key, now)
        if err is not None:
            raise err
        if self.cfg.gateway.log_unavailable == "refuse" and self.status.log_down:
            raise refused(503, "log_unavailable",
                          "the receipt log is unreachable and policy refuses to serve")
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise bad_request("invalid_json", "request body is not valid JSON") from None
        model, stream = _validate(obj, call.kind)
        sealer: aci.Sealer | None = None
        mode = hdrs.get(b"x-e2ee")
        if mode is not None:
            if self.e2ee_key is None:
                raise bad_request("e2ee_unavailable", "this gateway has no E2EE key")
            try:
                obj, sealer = aci.open_request(
                    obj, call.kind, mode.decode("latin-1"),
                    hdrs.get(b"x-e2ee-client-key", b"").decode("latin-1"),
                    hdrs.get(b"x-e2ee-enc", b"").decode("latin-1"), self.e2ee_key)
            except aci.AciError as e:
                raise bad_request("e2ee_invalid", f"E2EE request rejected: {e}") from None
            call.e2ee_mode = aci.MODE
            call.sealer = sealer
        routes = self.router.candidates(model, call.kind)
        if not routes:
            raise GatewayError(404, "model_not_found", f"model {model[:64]!r} is not served here"
                               + (" on this endpoint" if self.router.knows(model) else ""),
                               param="model")
        refusals: list[GatewayError] = []
        for route in routes:
            try:
                lease = await self._acquire(route)
            except GatewayError as e:
                refusals.append(e)
                continue
            signed_only = lease.binding.startswith(SIGNATURE_BINDING)
            if signed_only and stream:
                refusals.append(refused(
                    502, "binding_mismatch", f"route {route.id!r} refused: its lease binds only a "
                    "response-signing key, so a stream could not be verified before delivery",
                    route_id=route.id))
                continue
            call.route, call.lease = route, lease
            fwd = dict(obj)
            fwd["model"] = route.upstream_model
            fwd_bytes = orjson.dumps(fwd)
            call.forwarded_hash = call.provider_request_hash = \
                hashlib.sha256(fwd_bytes).hexdigest()
            try:
                reply = await self._send(call, route, lease, fwd_bytes, stream)
                if signed_only and reply.status == 200:
                    await self._check_response_signature(call, route, lease, fwd_bytes, reply)
            except GatewayError as e:
                call.attempts.append(f"{route.id}:{e.code}")
                if e.code == "binding_mismatch":  # refused on the handshake: nothing forwarded
                    call.forwarded_hash = call.provider_request_hash = None
                refusals.append(e)
                continue
            call.upstream_status = reply.status
            if reply.streaming:
                await self._stream(call, reply, sealer, send)
                return None, b"", b""
            return self._finish_json(call, reply, sealer)
        first = next((e for e in refusals if e.status == 504 or e.code.startswith("upstream_")
                      and e.code not in ("upstream_unverified",)), refusals[0])
        detail = "; ".join(e.message for e in refusals)
        raise GatewayError(first.status, first.code, f"no usable route for model {model[:64]!r}: "
                           f"{detail}", type_=first.type, route_id=first.route_id)

    async def _send(self, call: Call, route: RouteSpec, lease: LeaseFacts, body: bytes,
                    stream: bool) -> UpstreamReply:
        """Forward under the lease; if the provider's TLS key no longer matches it (a key
        rotation, or an impostor), re-verify once and retry once under the new lease.
        The refused handshake sent no byte; a failed re-verification refuses the call."""
        assert self.upstream is not None
        path = UPSTREAM_PATH[call.kind]
        try:
            return await self.upstream.send(route, lease, path, body, stream)
        except GatewayError as e:
            if e.code != "binding_mismatch" or lease.pin is None:
                raise
            first = e
        log.info("route %s: provider key differs from lease %s; re-verifying once",
                 route.id, lease.lease_id)
        await self.leases.invalidate(route, lease)
        fresh = await self._acquire(route)
        if fresh.pin == lease.pin:
            raise first
        call.lease = fresh
        call.attempts.append(f"{route.id}:binding_mismatch")
        return await self.upstream.send(route, fresh, path, body, stream)

    async def _check_response_signature(self, call: Call, route: RouteSpec, lease: LeaseFacts,
                                        forwarded: bytes, reply: UpstreamReply) -> None:
        """For a lease bound to a signing key (vllm-proxy style): the provider's signature over
        `sha256(forwarded request):sha256(response)` must recover to the attested address, or
        the response is withheld (`response_signature_invalid`)."""
        from gateway.verification import phala

        address = lease.binding.removeprefix(SIGNATURE_BINDING)
        try:
            chat_id = orjson.loads(reply.body)["id"]
            if not isinstance(chat_id, str) or not RESPONSE_ID.fullmatch(chat_id):
                raise ValueError("no usable response id")
            assert self.signatures is not None
            sig = await phala.fetch_signature(self.signatures, route, chat_id)
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

    def _finish_json(self, call: Call, reply: UpstreamReply,
                     sealer: aci.Sealer | None) -> tuple[int, bytes, bytes]:
        data = reply.body
        call.provider_response_hash = hashlib.sha256(data).hexdigest()
        ctype = reply.content_type.encode("latin-1")
        if reply.status == 200:
            try:
                resp = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise refused(502, "upstream_bad_response",
                              f"route {call.route.id!r}: provider sent malformed JSON"
                              if call.route else "provider sent malformed JSON") from None
            if isinstance(resp, dict):
                call.usage = _usage(resp.get("usage"))
                if sealer is not None:
                    data = orjson.dumps(sealer.seal_response(resp))
                    ctype = JSON
        elif reply.status >= 400:
            call.refusal = {"code": "upstream_rejected", "status": reply.status}
            if sealer is not None:  # the provider's text could echo content: not in clear
                err = GatewayError(reply.status, "upstream_rejected",
                                   f"provider rejected the request with HTTP {reply.status}",
                                   type_="upstream_error")
                return reply.status, err.body(), JSON
        if call.usage:
            self.limiter.charge(call.key, call.usage.get("total_tokens", 0))
        return reply.status, data, ctype

    async def _stream(self, call: Call, reply: UpstreamReply, sealer: aci.Sealer | None,
                      send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            *self._headers(call)]})
        prov = hashlib.sha256()
        resp = hashlib.sha256()
        events = aci.SseSplitter()
        try:
            async for chunk in reply.chunks():
                prov.update(chunk)
                out = b""
                for ev in events.feed(chunk):
                    payload = aci.sse_data(ev)
                    if payload is not None and payload != b"[DONE]" and (
                            sealer is not None or b'"usage"' in payload):
                        out += self._stream_event(call, ev, payload, sealer)
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
            self.limiter.charge(call.key, call.usage.get("total_tokens", 0))
        await self._commit(call, resp.hexdigest())
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _stream_event(self, call: Call, ev: bytes, payload: bytes,
                      sealer: aci.Sealer | None) -> bytes:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ev
        if not isinstance(obj, dict):
            return ev
        u = _usage(obj.get("usage"))
        if u:
            call.usage = u
        if sealer is None:
            return ev
        return b"data: " + orjson.dumps(sealer.seal_response(obj)) + b"\n\n"

    async def _commit(self, call: Call, response_hash: str) -> None:
        """Sign the call's receipt and commit it to the outbox (the shipper picks it up)."""
        route = call.route
        body: dict[str, Any] = {
            "v": "pag-receipt/1", "id": call.receipt_id, "time": now_rfc3339(),
            "gateway": self.identity, "request_hash": call.request_hash,
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
        _, entry = self.signer.sign(body)
        await self.outbox.put(call.receipt_id, call.request_hash, entry)

