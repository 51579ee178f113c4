"""The demo's local OpenAI-compatible model provider.

`python -m gateway.demo.provider --listen HOST:PORT --dstack SOCKET [--tls-listen HOST:PORT]`

Serves `POST /v1/chat/completions` (JSON, or SSE with `stream_options.include_usage`),
`POST /v1/embeddings` (float or base64 vectors), `GET /v1/models` and
`GET /.well-known/attestation[?nonce=HEX]`, the latter built by
`gateway.identity.attestation.build` from the keyset its own dstack guest agent (the
simulator in the demo) derives, so the gateway's dstack adapter can verify it.
With `--tls-listen` the same app is also served over HTTPS with the attested
TLS key, which lets a route pin the provider's TLS SPKI. Model calls may be
sealed to its attested E2EE key (ACI `aci-1` or `2`, verifier/aci.py): it opens
them, answers as it would in clear, and seals the answer (each event of a stream)
back; nonces are accepted once.

Invariants: answers are a pure function of the request body (of the opened body
under E2EE; the same body gives the same bytes, including `id` and `created`);
nothing waits; bad input gets an OpenAI-shaped 4xx; no request or completion text
is logged. The
server limits of every service hold here too (`BoundedRunner`; the same
`--header-timeout`... flags, docs/config.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import signal
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.api.replay import MemoryReplay
from tlog.service import (
    REFUSALS,
    ServerLimits,
    add_limit_arguments,
    connection_cap,
    limits_from_args,
    listen_address,
)
from verifier import aci

log = logging.getLogger("gateway.demo.provider")

CHAT_MODEL = "demo-chat-1"
EMBED_MODEL = "demo-embed-1"
CREATED = 1_700_000_000
EMBED_DIM = 32
MAX_DIM = 4096
NONCE = re.compile(r"(?:[0-9a-fA-F]{2}){1,64}")
PHRASES = (
    "This answer comes from the local demo provider.",
    "The gateway verified this provider before forwarding your request.",
    "Every call through the gateway gets a signed receipt.",
    "Receipts are appended to a witnessed transparency log.",
    "No prompt or completion text ever reaches a receipt.",
    "The provider's simulated quote is trusted only because the demo policy allows it.",
    "Ask for the receipt with the x-receipt-id header.",
    "An inclusion proof ties your request hash to a cosigned checkpoint.",
)
JSON_HEADERS = {"Content-Type": "application/json"}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

Attest = Callable[[str | None], Awaitable[dict[str, Any]]]


class BadRequest(Exception):
    """A client error: (message, param) for an OpenAI-shaped 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_response(status: int, code: str, message: str, param: str | None = None
                   ) -> web.Response:
    """An OpenAI-shaped error."""
    body = {"error": {"message": message, "type": "invalid_request_error",
                      "code": code, "param": param}}
    return web.Response(status=status, body=orjson.dumps(body), headers=JSON_HEADERS)


def _text_of(content: Any) -> str:
    """The text of a message's content (string or array of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_tokens(text: str) -> int:
    """The demo's token count: whitespace-separated words."""
    return len(text.split())


def completion_text(digest: bytes) -> str:
    """The canned completion for a request digest: a tag and two phrases."""
    a = digest[0] % len(PHRASES)
    b = (a + 1 + digest[1] % (len(PHRASES) - 1)) % len(PHRASES)
    return f"[demo {digest[:4].hex()}] {PHRASES[a]} {PHRASES[b]}"


def _json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (BadRequest otherwise)."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(req, dict):
        raise BadRequest("request body must be a JSON object")
    return req


def parse_chat(body: bytes) -> dict[str, Any]:
    """A validated chat request object."""
    req = _json_object(body)
    if not isinstance(req.get("model"), str) or not req["model"]:
        raise BadRequest("'model' must be a non-empty string", "model")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
        raise BadRequest("'messages' must be a non-empty array of messages", "messages")
    if not isinstance(req.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    mt = req.get("max_completion_tokens", req.get("max_tokens"))
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise BadRequest("'max_tokens' must be a positive integer", "max_tokens")
    so = req.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return req


def chat_answer(body: bytes, req: dict[str, Any]) -> tuple[str, list[str], str, dict[str, int]]:
    """(completion id, content words, finish reason, usage) for a chat request."""
    digest = hashlib.sha256(body).digest()
    words = completion_text(digest).split(" ")
    finish = "stop"
    limit = req.get("max_completion_tokens", req.get("max_tokens"))
    if limit is not None and limit < len(words):
        words, finish = words[:limit], "length"
    prompt = sum(count_tokens(_text_of(m.get("content"))) for m in req["messages"])
    usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
             "total_tokens": prompt + len(words)}
    return "chatcmpl-" + digest[:12].hex(), words, finish, usage


def chat_completion(body: bytes, req: dict[str, Any]) -> bytes:
    """The non-streaming `chat.completion` object, serialised."""
    cid, words, finish, usage = chat_answer(body, req)
    return orjson.dumps({
        "id": cid, "object": "chat.completion", "created": CREATED, "model": req["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage, "system_fingerprint": "pag-demo"})


def chat_events(body: bytes, req: dict[str, Any]) -> list[bytes]:
    """The SSE events of a streamed completion, `data: [DONE]` last."""
    cid, words, finish, usage = chat_answer(body, req)
    so = req.get("stream_options") or {}
    with_usage = so.get("include_usage") is True
    base: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": CREATED,
                            "model": req["model"], "system_fingerprint": "pag-demo"}
    if with_usage:
        base["usage"] = None

    def event(delta: dict[str, Any], reason: str | None) -> bytes:
        chunk = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": reason}])
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    out = [event({"role": "assistant", "content": ""}, None)]
    out += [event({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)]
    out.append(event({}, finish))
    if with_usage:
        out.append(b"data: " + orjson.dumps(dict(base, choices=[], usage=usage)) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def embedding_vector(model: str, item: str, dim: int) -> list[float]:
    """A deterministic unit vector for one input."""
    raw = b""
    counter = 0
    seed = hashlib.sha256(model.encode() + b"\x00" + item.encode()).digest()
    while len(raw) < 2 * dim:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    vals = [(int.from_bytes(raw[2 * i:2 * i + 2], "big") - 32768) / 32768 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


def embeddings(body: bytes) -> bytes:
    """The `list` of embeddings for a request body (BadRequest on bad input)."""
    req = _json_object(body)
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", "model")
    inp = req.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and all(
            isinstance(x, int) and not isinstance(x, bool) for x in inp)):
        items: list[Any] = [inp]
    elif isinstance(inp, list) and inp:
        items = inp
    else:
        raise BadRequest("'input' must be a string or a non-empty array", "input")
    texts: list[str] = []
    for x in items:
        if isinstance(x, str):
            texts.append(x)
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in x):
            texts.append(" ".join(map(str, x)))
        else:
            raise BadRequest("'input' items must be strings or token arrays", "input")
    dim = req.get("dimensions", EMBED_DIM)
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise BadRequest(f"'dimensions' must be an integer from 1 to {MAX_DIM}", "dimensions")
    fmt = req.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data = []
    for i, t in enumerate(texts):
        vec = embedding_vector(model, t, dim)
        emb: Any = vec if fmt == "float" else base64.b64encode(
            struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(max(1, count_tokens(t)) for t in texts)
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def models_body() -> bytes:
    """The `GET /v1/models` answer."""
    return orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": CREATED, "owned_by": "pag-demo"}
        for m in (CHAT_MODEL, EMBED_MODEL)]})


class Sealed(Exception):
    """An E2EE request refused: (status, code, message) for an OpenAI-shaped error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class E2ee:
    """The provider's side of ACI E2EE: its attested key and the nonces it accepted."""

    def __init__(self, private_key: bytes | None) -> None:
        self.key = private_key
        self.public = aci.public_key(private_key) if private_key else None
        self.nonces = MemoryReplay()

    async def open(self, request: web.Request, body: bytes, kind: str
                   ) -> tuple[bytes, Any]:
        """(the body to answer, the response sealer or None when not sealed)."""
        names = {k.lower(): v for k, v in request.headers.items()
                 if k.lower() in aci.E2EE_HEADERS}
        try:
            h = aci.read_headers(names, time.time())
            if h is None:
                return body, None
            if self.key is None or self.public is None:
                raise Sealed(400, "e2ee_unavailable", "this provider has no E2EE key")
            aci.check_model_key(h, self.public)
            plain, sealer = aci.open_request(_json_object(body), kind, h, self.key)
        except aci.AciError as e:
            raise Sealed(400, e.code, e.message) from None
        except BadRequest as e:
            raise Sealed(400, "e2ee_decryption_failed", e.message) from None
        if not await self.nonces.claim(h.replay_key(), h.timestamp + aci.WINDOW):
            raise Sealed(400, "e2ee_replay_detected", "this E2EE nonce was already used")
        return orjson.dumps(plain), sealer


def sealed_body(sealer: Any, out: bytes) -> bytes:
    """A JSON answer with its fields sealed (unchanged without a sealer)."""
    return out if sealer is None else orjson.dumps(sealer.seal_response(orjson.loads(out)))


def sealed_event(sealer: Any, ev: bytes) -> bytes:
    """One `data: ` event with its chunk sealed (`[DONE]` and no sealer: unchanged)."""
    if sealer is None or ev == b"data: [DONE]\n\n":
        return ev
    return b"data: " + orjson.dumps(sealer.seal_response(orjson.loads(ev[6:-2]))) + b"\n\n"


def make_app(attest: Attest, e2ee_key: bytes | None = None) -> web.Application:
    """The aiohttp application; `attest(nonce)` builds the attestation document and
    `e2ee_key` (its attested X25519 key) opens sealed calls."""
    models = models_body()
    e2ee = E2ee(e2ee_key)

    def sealed_headers(sealer: Any, base: dict[str, str]) -> dict[str, str]:
        if sealer is None:
            return base
        return {**base, **{k.decode(): v.decode() for k, v in sealer.headers()}}

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body, sealer = await e2ee.open(request, await request.read(), "chat")
            req = parse_chat(body)
        except Sealed as e:
            return error_response(e.status, e.code, e.message)
        except BadRequest as e:
            return error_response(400, "invalid_request", e.message, e.param)
        if not req.get("stream", False):
            return web.Response(body=sealed_body(sealer, chat_completion(body, req)),
                                headers=sealed_headers(sealer, JSON_HEADERS))
        resp = web.StreamResponse(headers=sealed_headers(sealer, SSE_HEADERS))
        await resp.prepare(request)
        for ev in chat_events(body, req):
            await resp.write(sealed_event(sealer, ev))
        await resp.write_eof()
        return resp

    async def embed(request: web.Request) -> web.Response:
        try:
            body, sealer = await e2ee.open(request, await request.read(), "embeddings")
            out = embeddings(body)
        except Sealed as e:
            return error_response(e.status, e.code, e.message)
        except BadRequest as e:
            return error_response(400, "invalid_request", e.message, e.param)
        return web.Response(body=sealed_body(sealer, out),
                            headers=sealed_headers(sealer, JSON_HEADERS))

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, headers=JSON_HEADERS)

    async def attestation(request: web.Request) -> web.Response:
        nonce = request.query.get("nonce")
        if nonce is not None and not NONCE.fullmatch(nonce):
            return error_response(400, "invalid_nonce", "nonce must be 1 to 64 bytes of hex",
                                  "nonce")
        doc = await attest(nonce.lower() if nonce else None)
        return web.Response(body=orjson.dumps(doc),
                            headers={**JSON_HEADERS, "Cache-Control": "no-store"})

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, "not_found", "no such endpoint")

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embed)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/.well-known/attestation", attestation)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


class _Refused(asyncio.Protocol):
    """A connection past the cap with no idle one to make room: 503, closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSALS[503])  # type: ignore[attr-defined]
        transport.close()


class BoundedRunner(web.AppRunner):
    """An AppRunner under the server limits, with aiohttp's own knobs where it has them.

    aiohttp's keep-alive timer runs from a connection's opening and from each
    answer, and closes a connection whose next request head has not arrived: it
    bounds idle time and head time together (the shorter of `keep_alive_timeout`
    and `header_timeout`; an unread body is drained for as long after an answer).
    Header lines and fields are capped by size and count.
    A middleware marks requests in progress: a client with
    `max_connections_per_client` of them gets 503 for another, and a request
    (body and answer) gets `body_timeout`. A new connection at `max_connections`
    closes the oldest one with no request in progress, else gets 503."""

    def __init__(self, app: web.Application, limits: ServerLimits) -> None:
        self._limits = limits
        self._busy: dict[Any, int] = {}
        self._by_client: dict[str, int] = {}
        self._cap = connection_cap(limits)
        app.middlewares.append(self._track)
        field = min(8190, limits.max_header_bytes)
        idle = min(limits.keep_alive_timeout, limits.header_timeout)
        super().__init__(app, access_log=None, handle_signals=False,
                         keepalive_timeout=idle, lingering_time=idle,
                         max_line_size=field, max_field_size=field,
                         max_headers=max(1, limits.max_header_bytes // 256))

    @web.middleware
    async def _track(self, request: web.Request, handler: Any) -> web.StreamResponse:
        client = request.remote or ""
        per_client = self._limits.max_connections_per_client
        if per_client and self._by_client.get(client, 0) >= per_client:
            return error_response(503, "server_busy", "too many requests in progress from "
                                  "this address")
        proto = request.protocol
        self._busy[proto] = self._busy.get(proto, 0) + 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            async with asyncio.timeout(self._limits.body_timeout):
                return await handler(request)
        except TimeoutError:
            return error_response(408, "request_timeout", "request not completed in time")
        except ConnectionError:  # the client left: nothing to log (it would flood the log)
            return error_response(400, "client_disconnected", "client went away")
        finally:
            for book, key in ((self._busy, proto), (self._by_client, client)):
                book[key] -= 1
                if not book[key]:
                    del book[key]

    @property
    def server(self) -> Any:
        """The sites' protocol factory: aiohttp's, behind the connection cap."""
        inner = super().server
        if inner is None:
            return None

        def factory() -> asyncio.Protocol:
            open_ = inner.connections
            if len(open_) >= self._cap:
                victim = next((h for h in open_ if h not in self._busy), None)
                if victim is None:
                    return _Refused()
                victim.force_close()
            return inner()
        return factory


async def load_identity(socket_path: str) -> tuple[Attest, Any]:
    """(attest function, keyset) from the provider's own dstack guest agent."""
    from dstack_sdk import AsyncDstackClient

    from gateway.identity import attestation, keys

    client = AsyncDstackClient(socket_path)
    keyset = await keys.load(client, log_vkey="")

    async def attest(nonce: str | None) -> dict[str, Any]:
        return await attestation.build(client, keyset, nonce)

    return attest, keyset


def tls_context(keyset: Any) -> ssl.SSLContext:
    """A server TLS context with the keyset's attested TLS key and certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="pag-provider-tls-") as d:
        key, cert = Path(d) / "key.pem", Path(d) / "cert.pem"
        key.touch(mode=0o600)
        key.write_bytes(keyset.tls_key_pem())
        cert.write_bytes(keyset.tls_cert_pem())
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def serve(listen: tuple[str, int], dstack: str, tls_listen: tuple[str, int] | None,
                limits: ServerLimits) -> None:
    """Serve until SIGTERM/SIGINT; print one JSON line once listening."""
    attest, keyset = await load_identity(dstack)
    runner = BoundedRunner(make_app(attest, keyset.e2ee_private_bytes()), limits)
    await runner.setup()
    try:
        site = web.TCPSite(runner, listen[0], listen[1], reuse_address=True)
        await site.start()
        urls = {"provider": f"http://{listen[0]}:{listen[1]}/v1"}
        if tls_listen is not None:
            tls = web.TCPSite(runner, tls_listen[0], tls_listen[1],
                              ssl_context=tls_context(keyset), reuse_address=True)
            await tls.start()
            urls["tls"] = f"https://{tls_listen[0]}:{tls_listen[1]}/v1"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(json.dumps(urls), flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gateway.demo.provider`."""
    ap = argparse.ArgumentParser(prog="python -m gateway.demo.provider",
                                 description="local OpenAI-compatible demo model provider")
    ap.add_argument("--listen", type=listen_address, required=True, metavar="HOST:PORT")
    ap.add_argument("--dstack", required=True, metavar="SOCKET",
                    help="the provider's dstack guest-agent socket")
    ap.add_argument("--tls-listen", type=listen_address, metavar="HOST:PORT",
                    help="also serve HTTPS with the attested TLS key")
    add_limit_arguments(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="demo-provider: %(message)s")
    try:
        import uvloop
        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        with contextlib.suppress(KeyboardInterrupt):
            runner(serve(a.listen, a.dstack, a.tls_listen, limits_from_args(a)))
    except (OSError, ValueError) as e:
        print(f"demo-provider: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
