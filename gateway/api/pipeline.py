"""One model call as a sequence of named steps.

    read the body → authenticate → receipts keepable → parse → admit and reserve
      budget (one step) → open E2EE
      → for each candidate route, in priority order:
            acquire its lease → forward (re-verify once if the key rotated)
            → check the response signature (signature-bound leases only)
      → seal the answer (the JSON body, or each SSE event)
      → sign the receipt and queue it → settle → respond
                                  (and, however else the call ends: settle)

`model_call` is that sequence and nothing else; each step is a function of
what the earlier ones produced, so each can be tested alone. A `Call`
gathers what the receipt records; `Services` holds what the steps use.

Invariants:
- No byte goes upstream unless the route's lease satisfies its policy (the
  lease is acquired first; a TLS pin is checked on the handshake).
- Everything after authentication gets a receipt, refusals included (and a
  call the server cancels when its stop's grace period runs out: `stopped`);
  it is committed to the outbox before the response completes (before the
  last chunk of a stream). A call whose receipt cannot be kept is not answered:
  refused up front (503 `outbox_full` or `outbox_unavailable`, nothing
  forwarded, no receipt) when the outbox says so, else 503
  `outbox_unavailable` instead of the answer, or a stream cut off without its
  last chunk, when the commit fails.
- Prompt and completion text never reach a receipt, a log line or an error
  message; only hashes, routes, codes and usage counts do.
- Every call is charged: a key with a budget reserves the most the call could
  use before anything is forwarded, and settles with the real usage however
  the call ends. A stream is always asked for its usage upstream
  (`stream_options.include_usage`); if the client did not ask for it, the
  usage is taken out of what the client receives (and `response_hash` covers
  exactly what the client received; `provider_response_hash` what the
  provider sent).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
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

from gateway.api import shared
from gateway.api.apikeys import KeyStore
from gateway.api.config import ApiKey, Config, RouteSpec
from gateway.api.errors import (
    GatewayError,
    bad_request,
    error_body,
    refused,
    stopping,
    unauthorized,
)
from gateway.api.ratelimit import Hold, Limits, RedisLimits
from gateway.api.receipt_index import RedisReceiptIndex
from gateway.api.replay import MemoryReplay, ReplayStore, ReplayUnavailable
from gateway.api.router import Router
from gateway.api.routes import RouteBook, now_rfc3339
from gateway.receipts.outbox import Outbox, OutboxUnavailable, ReceiptSigner
from gateway.receipts.shipper import LogStatus
from gateway.upstream.client import Upstream, UpstreamReply
from gateway.upstream.leases import LeaseFacts
from gateway.verification.base import SIGNATURE_BINDING
from tlog.http1 import ProtocolError
from tlog.service import Receive, Scope, Send, respond
from verifier import aci, receipt, sse

log = logging.getLogger("gateway")

JSON = b"application/json"
OUTBOX_REFUSALS = {
    "outbox_full": "the receipt outbox is at its size bound until the log catches up; "
                   "nothing was forwarded",
    "outbox_unavailable": "receipts cannot be stored now (gateway storage fault); "
                          "nothing was forwarded",
}
RESPONSE_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
UPSTREAM_PATH = {"chat": "/chat/completions", "embeddings": "/embeddings"}
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
COMPLETION_LIMITS = ("max_completion_tokens", "max_tokens")
E2EE_REQUEST_HEADERS = tuple(h.encode() for h in aci.E2EE_HEADERS)
Headers = list[tuple[bytes, bytes]]
Sealer = aci.Sealer | Any  # aci.Sealer (aci-1) or aci_v2.Sealer (version 2)


@dataclass
class Services:
    """What the steps of a model call use (built once by the app)."""

    cfg: Config
    keys: KeyStore
    limiter: Limits
    router: Router
    routes: RouteBook
    signer: ReceiptSigner
    outbox: Outbox
    status: LogStatus
    identity: dict[str, str]
    keyset_index: int
    e2ee_key: bytes | None = None
    replay: ReplayStore = field(default_factory=MemoryReplay)
    receipt_index: RedisReceiptIndex | None = None  # [shared]: receipts any replica can find
    upstream: Upstream | None = None
    signatures: httpx.AsyncClient | None = None
    e2ee_public: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.e2ee_key is not None:
            self.e2ee_public = aci.public_key(self.e2ee_key)


@dataclass
class Request:
    """A parsed, validated request body (after E2EE fields are opened: plaintext)."""

    obj: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool = False  # a stream whose client asked for stream_options.include_usage


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
    sealer: Sealer | None = None
    upstream_opener: aci.Opener | None = None  # set when the route seals to the provider
    upstream_e2ee: dict[str, str] | None = None
    hold: Hold | None = None  # the budget reservation, until settled
    strip_usage: bool = False  # usage was asked upstream for the gateway, not the client
    status: int = 0
    stream: bool = False
    committing: bool = False  # its receipt is being (or was) signed and written

    def headers(self, status: int = 200) -> Headers:
        """The response headers every answer to this call carries (the E2EE ones only on a
        sealed answer: a refusal is the gateway's own, unsealed, error)."""
        h = [(b"x-request-hash", self.request_hash.encode()),
             (b"x-receipt-id", self.receipt_id.encode()),
             (b"x-receipt-salt", self.salt.hex().encode())]
        if self.sealer is not None and status == 200:
            h += self.sealer.headers()
        return h


# -- the sequence --------------------------------------------------------------------


async def model_call(svc: Services, scope: Scope, receive: Receive, send: Send,
                     kind: str) -> Call | None:
    """Serve one chat or embeddings call (the module docstring's sequence); the call as
    answered (its `status` set), or None when authentication refused it (401)."""
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
        return None
    await receipts_keepable(svc)
    call = Call(new_receipt_id(), salt, request_hash, kind, key)
    try:
        try:
            try:
                req = parse(body, kind, svc.cfg.gateway.max_messages,
                            svc.cfg.gateway.max_json_depth)
            except GatewayError:
                await admit(svc, key)  # a bad request takes its rate token all the same
                raise
            await admit_reserve(svc, call, req, len(body))
            call.sealer = await open_e2ee(svc, call, req, hdrs)
            call.stream = req.stream
            reply = await route_and_forward(svc, call, req)
            if reply.streaming:
                call.status = 200
                await relay_stream(svc, call, reply, send)
                return call  # the receipt was committed before the stream ended
            status, out, ctype = finish_json(svc, call, reply)
        except GatewayError as e:
            call.refusal = {"code": e.code, "status": e.status}
            if e.route_id is not None and call.route is None:
                call.route = svc.router.by_id.get(e.route_id)
            status, out, ctype = e.status, e.body(), JSON
    except asyncio.CancelledError:  # cut by the server's stop (`stopped`), or else not ours
        if not svc.status.stopping or call.committing or call.status:
            await settle(svc, call)
            raise
        err = stopped(call)
        status, out, ctype = err.status, err.body(), JSON
    except BaseException:
        await settle(svc, call)  # ended any other way: settled all the same
        raise
    try:
        await commit_receipt(svc, call, receipt.digest(call.salt, out))
    except OutboxUnavailable:
        raise refused(503, "outbox_unavailable", "the receipt could not be stored (gateway "
                      "storage fault); the answer is withheld") from None
    if not await logged_in_time(svc, call):
        err = refused(503, "log_unavailable",
                      "the receipt could not be logged in time; it stays queued")
        status, out, ctype = err.status, err.body(), JSON
        call.refusal = {"code": err.code, "status": err.status}
    call.status = status
    await respond(send, status, out, ctype, headers=call.headers(status))
    return call


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


async def receipts_keepable(svc: Services) -> None:
    """503 when the outbox cannot keep a receipt now (`Outbox.admit` decides). Nothing is
    forwarded and no receipt is written, so refused calls cannot grow the outbox."""
    code = await svc.outbox.admit()
    if code is not None:
        raise refused(503, code, OUTBOX_REFUSALS[code])


async def admit(svc: Services, key: ApiKey) -> None:
    """429 over the key's rate or budget; 503 if the replicas' list of revoked keys is stale
    or policy refuses to serve while the log is down."""
    if not svc.keys.revocations.fresh():
        raise shared.unavailable("whether this API key was revoked")
    err = await svc.limiter.admit(key, time.monotonic())
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
        for name in COMPLETION_LIMITS + ("n",):
            v = obj.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad_request("invalid_type", f"'{name}' must be a positive integer", name)
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
    wants_usage = stream and isinstance(so := obj.get("stream_options"), dict) \
        and so.get("include_usage") is True
    return Request(obj, model, stream, wants_usage)


def reserve_tokens(key: ApiKey, req: Request, body_size: int) -> int:
    """The most tokens a call could use: its prompt (at most one token per byte of the
    request body, which bounds any tokenizer's count of the text it carries) plus its
    completion (`max_completion_tokens` or `max_tokens`, else the key's
    `max_reserve_tokens`) for each of its `n` choices."""
    completion = next((req.obj[k] for k in COMPLETION_LIMITS if req.obj.get(k) is not None),
                      key.max_reserve_tokens)
    n = req.obj.get("n") or 1
    return body_size + (completion * n if "messages" in req.obj else 0)


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


async def admit_reserve(svc: Services, call: Call, req: Request, body_size: int) -> None:
    """`admit` and the reservation of the call's bound against the key's budget, before
    anything is forwarded, in one step (one Redis round trip with `[shared]`): 429 over the
    key's rate or budget (`budget_exceeded` if the bound does not fit); 503 if the revoked
    keys are stale or policy refuses to serve while the log is down (the reservation, made
    by then, is released by `settle`)."""
    if not svc.keys.revocations.fresh():
        raise shared.unavailable("whether this API key was revoked")
    call.hold = await svc.limiter.admit_reserve(call.key, time.monotonic(),
                                                reserve_tokens(call.key, req, body_size))
    if svc.cfg.gateway.log_unavailable == "refuse" and svc.status.log_down:
        raise refused(503, "log_unavailable",
                      "the receipt log is unreachable and policy refuses to serve")


def settlement(call: Call) -> tuple[Hold, int] | None:
    """Take the call's reservation and what to charge for it: its real usage; if the
    provider answered without saying what it used, the whole reservation. None once taken."""
    hold, call.hold = call.hold, None
    if hold is None:
        return None
    if call.usage and "total_tokens" in call.usage:
        return hold, call.usage["total_tokens"]
    return hold, hold.tokens if call.upstream_status == 200 else 0


async def settle(svc: Services, call: Call) -> None:
    """Release the call's reservation, charging its real usage. Runs once, however the call
    ended (`commit_receipt` does it for a call that gets a receipt)."""
    s = settlement(call)
    if s is not None:
        await svc.limiter.settle(*s)


async def open_e2ee(svc: Services, call: Call, req: Request,
                    hdrs: dict[bytes, bytes]) -> Sealer | None:
    """Open the sealed fields of an ACI E2EE request (verifier/aci.py); its response sealer.

    In order: the headers (present, known version, nonce form, timestamp window), the
    model key is the attested one (after a key rotation the client re-attests and
    retries), the fields open, and only then the nonce is claimed, once (replay store,
    fail closed). A request without E2EE headers passes unchanged (None)."""
    try:
        h = aci.read_headers({k.decode("latin-1"): hdrs[k].decode("latin-1")
                              for k in E2EE_REQUEST_HEADERS if k in hdrs}, time.time())
        if h is None:
            return None
        if svc.e2ee_key is None:
            raise bad_request("e2ee_unavailable", "this gateway has no E2EE key")
        aci.check_model_key(h, svc.e2ee_public or b"")
        req.obj, sealer = aci.open_request(req.obj, call.kind, h, svc.e2ee_key)
    except aci.AciError as e:
        raise bad_request(e.code, f"E2EE request refused: {e.message}") from None
    try:
        fresh = await svc.replay.claim(h.replay_key(), h.timestamp + aci.WINDOW)
    except ReplayUnavailable as e:
        raise GatewayError(503, "e2ee_replay_unavailable", "the E2EE replay cache cannot "
                           f"record the nonce, so the request is refused: {e}") from None
    if not fresh:
        raise bad_request("e2ee_replay_detected", "this E2EE nonce was already used")
    call.e2ee_mode = h.version
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
        if req.stream:  # every call is charged: the usage is asked for, whoever wants it
            fwd["stream_options"] = {**(req.obj.get("stream_options") or {}),
                                     "include_usage": True}
            call.strip_usage = not req.wants_usage
        fwd_bytes = orjson.dumps(fwd)
        call.forwarded_hash = call.provider_request_hash = receipt.digest(call.salt, fwd_bytes)
        headers = None
        call.upstream_opener = call.upstream_e2ee = None
        if route.e2ee:
            try:
                fwd_bytes, headers = seal_upstream(call, route, lease, fwd)
            except GatewayError as e:
                call.forwarded_hash = call.provider_request_hash = None
                refusals.append(e)
                continue
            call.provider_request_hash = receipt.digest(call.salt, fwd_bytes)
        try:
            reply = await forward(svc, call, route, lease, fwd_bytes, req.stream, headers)
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
                  stream: bool, headers: dict[str, str] | None = None) -> UpstreamReply:
    """Send under the lease; if the provider's TLS key no longer matches it (a key
    rotation, or an impostor), re-verify once and retry once under the new lease.
    The refused handshake sent no byte; a failed re-verification refuses the call."""
    assert svc.upstream is not None  # noqa: S101 - type narrowing: startup() opens the pool before any request
    path = UPSTREAM_PATH[call.kind]
    try:
        return await svc.upstream.send(route, lease, path, body, stream, headers)
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
    return await svc.upstream.send(route, fresh, path, body, stream, headers)


def seal_upstream(call: Call, route: RouteSpec, lease: LeaseFacts,
                  fwd: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Seal the forwarded request to the provider's attested E2EE key (aci-1): (body,
    headers). The receipt records it (`upstream.e2ee`); a lease without such a key
    refuses the route before anything is sent."""
    if lease.e2ee_key is None:
        raise refused(502, "binding_mismatch", f"route {route.id!r} refused: binding_mismatch: "
                      "the route seals to the provider's E2EE key but its attestation names "
                      "none", route_id=route.id)
    sealed, headers, call.upstream_opener = aci.seal_request(fwd, call.kind, lease.e2ee_key,
                                                             now=time.time())
    call.upstream_e2ee = {"mode": aci.VERSION,
                          "key": base64.b64encode(lease.e2ee_key).decode()}
    return orjson.dumps(sealed), headers


def open_upstream(call: Call, reply: UpstreamReply) -> None:
    """Read the provider's E2EE response headers (a 200 must be sealed to us)."""
    assert call.upstream_opener is not None  # noqa: S101 - type narrowing: set with the route's seal step
    try:
        call.upstream_opener.start({k.decode("latin-1"): v.decode("latin-1")
                                    for k, v in reply.headers.items()})
    except aci.AciError as e:
        raise refused(502, "upstream_e2ee_invalid", f"route "
                      f"{call.route.id if call.route else '-'!r}: the provider's answer is "
                      f"not sealed to the gateway: {e.code}") from None


async def check_response_signature(svc: Services, call: Call, forwarded: bytes,
                                   reply: UpstreamReply) -> None:
    """For a lease bound to a signing key (vllm-proxy style): the provider's signature over
    `sha256(forwarded request):sha256(response)` must recover to the attested address, or
    the response is withheld (`response_signature_invalid`)."""
    from gateway.verification import phala

    route, lease = call.route, call.lease
    assert route is not None and lease is not None and svc.signatures is not None  # noqa: S101 - type narrowing: only signature-bound leases reach here
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


PROVIDER_CODE = re.compile(r"[a-z0-9_.-]{1,64}")


def provider_error(data: bytes, status: int) -> bytes:
    """A provider's own error answer (4xx) in the gateway's error shape: JSON with a code.

    What an OpenAI-style body says is kept: its `message` (at most 500 characters), its
    `code` when it is a short token (else `upstream_rejected`), its `type` and `param`
    when strings. Anything else (HTML, text, other JSON) becomes the gateway's own
    `upstream_rejected`, so no provider's bytes or content type reach the caller as the
    gateway's answer."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, dict):
        err = {}
    message, code, type_, param = (err.get(k) for k in ("message", "code", "type", "param"))
    return error_body(
        f"provider answered HTTP {status}: {message[:500]}" if isinstance(message, str)
        else f"provider answered HTTP {status}",
        type_ if isinstance(type_, str) else "upstream_error",
        code if isinstance(code, str) and PROVIDER_CODE.fullmatch(code) else "upstream_rejected",
        param if isinstance(param, str) else None)


def finish_json(svc: Services, call: Call, reply: UpstreamReply) -> tuple[int, bytes, bytes]:
    """(status, body, content type) of a whole (non-streamed) reply: usage charged, fields
    sealed under E2EE. Under E2EE nothing but a sealed 200 leaves: a provider's error text
    could echo content, so the caller gets the gateway's own error instead."""
    data = reply.body
    call.provider_response_hash = receipt.digest(call.salt, data)
    ctype = reply.content_type.encode("latin-1")
    resp: Any = None
    if reply.status == 200:
        try:
            resp = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise refused(502, "upstream_bad_response",
                          f"route {call.route.id!r}: provider sent malformed JSON"
                          if call.route else "provider sent malformed JSON") from None
        if call.upstream_opener is not None:
            open_upstream(call, reply)
            try:
                resp = call.upstream_opener.open_response(resp)
            except aci.AciError as e:
                raise refused(502, "upstream_e2ee_invalid", "the provider's sealed answer "
                              f"does not open: {e.code}") from None
            data, ctype = orjson.dumps(resp), JSON
        if isinstance(resp, dict):
            call.usage = usage_of(resp.get("usage"))
    elif reply.status >= 400:
        call.refusal = {"code": "upstream_rejected", "status": reply.status}
        if call.sealer is None:
            return reply.status, provider_error(data, reply.status), JSON
    if call.sealer is None:
        return reply.status, data, ctype
    if reply.status != 200:
        status = reply.status if reply.status >= 400 else 502
        err = GatewayError(status, "upstream_rejected", f"provider answered HTTP "
                           f"{reply.status}; its body is withheld from an E2EE caller",
                           type_="upstream_error")
        call.refusal = {"code": err.code, "status": status}
        return status, err.body(), JSON
    try:
        if not isinstance(resp, dict):
            raise aci.AciError("e2ee_unsealable", "the response is not a JSON object")
        return 200, orjson.dumps(call.sealer.seal_response(resp)), JSON
    except aci.AciError as e:
        call.refusal = {"code": e.code, "status": 502}
        err = refused(502, e.code, f"the provider's answer cannot be sealed, so it is "
                      f"withheld: {e.message}")
        return err.status, err.body(), JSON


async def relay_stream(svc: Services, call: Call, reply: UpstreamReply, send: Send) -> None:
    """Relay an SSE stream event by event, then commit the receipt before the final empty
    chunk. In clear, each event's exact bytes are relayed; under E2EE each event is
    re-encoded with its fields sealed, and an event that cannot be sealed (not JSON, an
    `event:` type other than message, unterminated, oversized) ends the stream with an
    error event: plaintext never leaves. A broken upstream stream ends it and is recorded."""
    if call.upstream_opener is not None:
        try:
            open_upstream(call, reply)
        except GatewayError:
            if reply.conn is not None:
                reply.conn.close()
            raise
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
        *call.headers()]})
    prov = receipt.digester(call.salt)
    resp = receipt.digester(call.salt)
    parser: sse.SseParser | None = sse.SseParser()

    async def emit(out: bytes) -> None:
        resp.update(out)
        await send({"type": "http.response.body", "body": out, "more_body": True})

    chunks = reply.chunks()
    cut = b""  # the error event that ends a stream cut by the stop, sent with its end
    try:
        async for chunk in chunks:
            prov.update(chunk)
            if parser is None:  # the plain relay lost the event boundaries: bytes as they come
                await emit(chunk)
                continue
            try:
                events = parser.feed(chunk)
            except sse.SseError:
                events, parser = [], None
                if call.sealer is not None or call.upstream_opener is not None:
                    await emit(stream_error(call, "e2ee_unsealable", "an event is too large"))
                    break
                await emit(chunk)
            out = b"".join([relay_event(call, ev) for ev in events])
            if out:
                await emit(out)
            if call.refusal is not None:
                break
        else:
            rest = parser.rest() if parser is not None else b""
            if call.sealer is None and call.upstream_opener is None:
                if rest:
                    await emit(rest)
            elif rest.strip(b"\r\n"):
                await emit(stream_error(call, "e2ee_unsealable", "the stream ended inside "
                                        "an event"))
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as e:
        call.refusal = {"code": "upstream_stream_broken", "status": 200}
        log.warning("stream broken %s: %s", call.request_hash, type(e).__name__)
    except asyncio.CancelledError:  # the stop's grace ran out (perhaps while a send waited
        if not svc.status.stopping:  # on a client that does not read): nothing more is
            raise                    # sent before the receipt is committed
        err = stopped(call)
        cut = stream_error(call, err.code, err.message)
        resp.update(cut)
    finally:
        await chunks.aclose()  # a stream ended early releases (closes) its connection
    call.provider_response_hash = prov.hexdigest()
    try:
        await commit_receipt(svc, call, resp.hexdigest())
    except OutboxUnavailable:  # not acknowledged: an error event, and no last chunk
        await send({"type": "http.response.body", "more_body": True, "body": stream_error(
            call, "outbox_unavailable", "the receipt could not be stored")})
        call.refusal = {"code": "outbox_unavailable", "status": 503}
        return
    await send({"type": "http.response.body", "body": cut, "more_body": False})


def relay_event(call: Call, ev: sse.Event) -> bytes:
    """The bytes relayed for one upstream event: usage noted (and taken out when only the
    gateway asked for it: a usage-only event is dropped, a `usage` member removed); in
    clear its exact bytes, under E2EE the sealed event (or, if it cannot be sealed, the
    error that ends the stream)."""
    relayed = call.sealer is None and call.upstream_opener is None  # bytes pass unchanged
    if ev.data == b"[DONE]" and ev.type == "message":
        return ev.raw if relayed else sse.encode(b"[DONE]")
    obj: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(ev.data)
    if call.upstream_opener is not None:
        if ev.type != "message" or not isinstance(obj, dict):
            return stream_error(call, "upstream_e2ee_invalid", "a provider event is not sealed")
        try:
            obj = call.upstream_opener.open_response(obj)
        except aci.AciError as e:
            return stream_error(call, "upstream_e2ee_invalid", f"a provider event does not "
                                f"open: {e.code}")
    if isinstance(obj, dict):
        u = usage_of(obj.get("usage"))
        if u:
            call.usage = u
        if call.strip_usage and "usage" in obj:  # the client did not ask: none of it
            if obj["usage"] is not None and not obj.get("choices"):
                return b""
            obj = {k: v for k, v in obj.items() if k != "usage"}
            relayed = False
    if relayed:
        return ev.raw
    if call.sealer is None:
        return sse.encode(orjson.dumps(obj))
    return seal_event(call, ev, obj)


def seal_event(call: Call, ev: sse.Event, obj: Any) -> bytes:
    """One event sealed for an E2EE caller: `data:` of the sealed chunk (id, retry and
    comments dropped), or the error event that ends the stream."""
    assert call.sealer is not None  # noqa: S101 - type narrowing: set by open_e2ee for sealed calls
    if ev.type != "message":
        return stream_error(call, "e2ee_unsealable", "an event of another type than message")
    if not isinstance(obj, dict):
        return stream_error(call, "e2ee_unsealable", "an event that is not a JSON object")
    try:
        return sse.encode(orjson.dumps(call.sealer.seal_response(obj)))
    except aci.AciError as e:
        return stream_error(call, e.code, e.message)


def stopped(call: Call) -> GatewayError:
    """The server, stopping (`LogStatus.stopping`), cancelled this call: the stop's grace
    period (`[gateway] shutdown_grace`) ran out before the answer. The cancel is absorbed
    (the call goes on to its receipt, recording `gateway_stopping`, and a 503, or a
    stream's error event and end), and `Gateway.shutdown` waits for that before the outbox
    closes: a call forwarded upstream is never left without a receipt. A call cancelled
    once its receipt was being written (`call.committing`) is not: that receipt stands, and
    the cancel goes on."""
    absorb_cancel()
    err = stopping("the gateway is stopping and could not finish this call in time; its "
                   "receipt records that")
    call.refusal = {"code": err.code, "status": 200 if call.status == 200 else err.status}
    return err


def absorb_cancel() -> None:
    """Take back the cancel the current task just caught (`Task.uncancel`): it goes on."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def stream_error(call: Call, code: str, reason: str) -> bytes:
    """The error event that ends a stream early (OpenAI error shape); recorded as the
    call's refusal. The reason names the rule, never content."""
    call.refusal = {"code": code, "status": 200}
    err = GatewayError(502, code, f"stream ended by the gateway: {reason}",
                       type_="upstream_error")
    return sse.encode(err.body())


def new_receipt_id() -> str:
    """A fresh receipt id: 32 hex digits, the first 12 the Unix time in milliseconds and the
    other 20 random (80 bits, so ids stay unguessable). Ids sort by time, so the outbox's
    unique index on them grows at its end: one page per commit, not one random page per
    receipt."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def receipt_body(call: Call, identity: dict[str, str], keyset_index: int,
                 response_hash: str) -> dict[str, Any]:
    """The unsigned receipt of a call (docs/receipts.md); `keyset_index` is the log index of
    the keyset entry holding the signing key (logged before the gateway listened)."""
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
        "keyset_index": keyset_index,
    }
    if call.usage:
        body["usage"] = call.usage
    if call.refusal:
        body["refusal"] = call.refusal
    if call.upstream_status is not None:
        body["upstream_status"] = call.upstream_status
    if call.attempts:
        body["failed_attempts"] = call.attempts
    if call.upstream_e2ee is not None and call.lease is not None:
        body["upstream"]["e2ee"] = call.upstream_e2ee
    if call.response_signature is not None and call.lease is not None:
        body["upstream"]["response_signature"] = call.response_signature
    return body


async def commit_receipt(svc: Services, call: Call, response_hash: str) -> None:
    """Sign the call's receipt and commit it to the outbox (the shipper picks it up), then
    settle the call (`settle`) and, with `[shared]`, record the receipt where the other
    replicas find it: one Redis script for both when both go to Redis, settling first (a
    failed index write never skips the settlement). The call is settled even if
    signing or the outbox fails."""
    call.committing = True
    try:
        _, entry = svc.signer.sign(receipt_body(call, svc.identity, svc.keyset_index,
                                                response_hash))
        await svc.outbox.put(call.receipt_id, call.request_hash, entry, call.key.sha256)
    except BaseException:
        await settle(svc, call)
        raise
    index, lim = svc.receipt_index, svc.limiter
    s = settlement(call) if index is not None and isinstance(lim, RedisLimits) else None
    if index is None or s is None or not s[0].tokens:
        await settle(svc, call)
        if index is not None:
            await index.put(call.receipt_id, call.request_hash, entry, call.key.sha256)
        return
    records = index.records(call.receipt_id, call.request_hash, entry, call.key.sha256)
    failed = await lim.settle_and_set(*s, records, index.ttl)
    index.stored(len(records) if failed is None else failed)


async def logged_in_time(svc: Services, call: Call) -> bool:
    """False only if policy requires inclusion before answering and it did not come in time."""
    g = svc.cfg.gateway
    if not (g.require_log_inclusion and svc.status.enabled and call.refusal is None):
        return True
    return await svc.status.wait_logged(call.receipt_id, g.log_wait_timeout)
