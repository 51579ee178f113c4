"""The gateway's ASGI application (raw ASGI on the hot path).

It dispatches by path: model calls go to the pipeline (gateway/api/pipeline.py,
where the invariants of a call are stated); the rest are small read-only
endpoints: models, attestation, receipt lookup, the admin route view, health
(`/healthz` alive, `/readyz` dependencies reachable), Prometheus `/metrics` and
`/openapi.json` (the API described by hand, gateway/api/openapi.json).

Every request is counted and timed (gateway/api/metrics.py) and every model call
logs one JSON line (gateway/api/jsonlog.py). An exception that escapes a handler
is a bug: it is logged by type and stack only and answered `500 internal_error`
(if nothing was sent yet), never with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.api import jsonlog, pipeline, shared
from gateway.api.apikeys import KeyStore, RedisRevocations, Revocations, admin_ok
from gateway.api.attestation import Attest, AttestationDocuments
from gateway.api.config import Config
from gateway.api.errors import GatewayError, bad_request, stopping, unauthorized
from gateway.api.health import Check, Readiness
from gateway.api.metrics import CONTENT_TYPE as METRICS_TYPE
from gateway.api.metrics import Gauge, Metrics
from gateway.api.ratelimit import Limiter, Limits, RedisLimits
from gateway.api.receipt_index import Indexed, RedisReceiptIndex, logged_proof
from gateway.api.replay import MemoryReplay, RedisReplay, ReplayStore
from gateway.api.router import Router
from gateway.api.routes import RouteBook
from gateway.receipts.outbox import Outbox, ReceiptSigner
from gateway.receipts.shipper import LogStatus, ProofChecker
from gateway.upstream.client import Upstream
from gateway.upstream.leases import Leases
from tlog.service import Receive, Scope, Send, respond
from verifier import version

JSON = pipeline.JSON
HEX64 = re.compile(r"[0-9a-f]{64}")
RECEIPT_ID = re.compile(r"[0-9a-f]{32}")
NONCE = re.compile(r"(?:[0-9a-fA-F]{2}){1,64}")
MODEL_CALLS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
GETS = ("/v1/models", "/.well-known/attestation", "/v1/routes", "/healthz", "/readyz",
        "/metrics", "/openapi.json")
ENDPOINTS = {**MODEL_CALLS, "/v1/models": "models", "/.well-known/attestation": "attestation",
             "/v1/routes": "routes", "/healthz": "healthz", "/readyz": "readyz",
             "/metrics": "metrics", "/openapi.json": "openapi"}
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()
"""The OpenAPI 3 description of the gateway's HTTP API, written by hand."""
LEASE_STATES = ("verified", "unverified-allowed", "refused", "unknown")
COUNTS_TTL = 1.0  # seconds the outbox counts shown by /metrics may be old
CUT_WAIT = 2.0  # seconds shutdown waits for cancelled calls to write their receipts
log = logging.getLogger("gateway.api.app")


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (lower-case name), or None."""
    return next((v for k, v in scope["headers"] if k == name), None)


class Gateway:
    """The ASGI app; `startup`/`shutdown` run from the ASGI lifespan protocol."""

    def __init__(self, cfg: Config, *, signer: ReceiptSigner, identity: dict[str, str],
                 outbox: Outbox, status: LogStatus, leases: Leases, attest: Attest,
                 keyset_index: int, e2ee_key: bytes | None = None,
                 keyset_proof: str | None = None, readiness: Readiness | None = None,
                 tracer: Any = None, shared_mac_key: bytes | None = None) -> None:
        router = Router(cfg.routes)
        sh = cfg.shared
        self.redis = shared.connect(sh) if sh.redis_url else None  # [shared]: one pool
        limiter: Limits = Limiter()
        index = None
        revocations: Revocations | None = None
        self.revocations: RedisRevocations | None = None
        self._refresh: asyncio.Task[None] | None = None
        if self.redis is not None:
            revocations = self.revocations = RedisRevocations(self.redis, sh.prefix)
            if shared_mac_key is None:
                raise ValueError("[shared] redis_url needs the replicas' shared MAC key")
            limiter = RedisLimits(self.redis, sh.prefix, sh.hold_seconds)
            index = RedisReceiptIndex(self.redis, sh.prefix, shared_mac_key,
                                      sh.receipt_ttl_seconds)
        replay: ReplayStore = MemoryReplay(cfg.e2ee.max_entries)
        if (where := cfg.replay_redis) is not None:
            url, prefix = where
            replay = RedisReplay(url, prefix, self.redis if url == sh.redis_url else None)
        self.svc = pipeline.Services(
            cfg=cfg, keys=KeyStore(cfg.api_keys, revocations), limiter=limiter, router=router,
            routes=RouteBook(router.routes, leases), signer=signer, outbox=outbox,
            status=status, identity=identity, keyset_index=keyset_index, e2ee_key=e2ee_key,
            replay=replay, receipt_index=index)
        self._proofs = ProofChecker(cfg.log.vkey, cfg.log.witness_vkeys, cfg.log.quorum) \
            if index is not None and cfg.log.url else None
        self.keyset_proof = keyset_proof
        self.log_http: httpx.AsyncClient | None = None
        g = cfg.gateway
        self.attestations = AttestationDocuments(
            attest, ttl=g.attestation_cache_seconds,
            per_client_per_minute=g.attestation_nonce_per_client_per_minute,
            global_per_second=g.attestation_nonce_per_second)
        self.metrics = Metrics()
        self.tracer = tracer  # an OpenTelemetry Tracer ([gateway] traces), or None
        self.readiness = readiness or Readiness([Check("outbox", outbox.probe)])
        self._counts: tuple[float, tuple[int, int]] = (float("-inf"), (0, 0))
        self._models_body = orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "pag"}
            for m in router.models()]})

    async def startup(self) -> None:
        """Open the upstream pool and start following the shipping ledger."""
        self.svc.upstream = Upstream()
        if self.revocations is not None:  # first read now; until one succeeds, calls are 503
            with contextlib.suppress(*shared.errors()):
                await self.revocations.refresh()
            self._refresh = asyncio.create_task(self.revocations.run())
        if self._proofs is not None:
            self.log_http = httpx.AsyncClient()  # proofs of receipts other replicas signed
        if any(r.evidence == "phala" for r in self.svc.cfg.routes):
            self.svc.signatures = httpx.AsyncClient()  # CA-verified: it may carry the route's key
        await self.svc.status.start()

    async def shutdown(self) -> None:
        """Once the requests still running are done, close the pool and stop following
        the ledger. Every listener's server stops at once, but this runs when the one with
        the lifespan has finished: another's calls may still be within their grace, and
        those a server cancels then write their receipts (`pipeline.stopped`). So it waits
        at most `shutdown_grace` + CUT_WAIT seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.svc.cfg.gateway.shutdown_grace + CUT_WAIT
        while self.metrics.inflight and loop.time() < until:
            await asyncio.sleep(0.01)
        if self.svc.upstream is not None:
            await self.svc.upstream.close()
        if self.svc.signatures is not None:
            await self.svc.signatures.aclose()
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        await self.svc.replay.close()
        if self.log_http is not None:
            await self.log_http.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.svc.status.close()

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

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one request, counting and timing it whatever happens."""
        start = time.perf_counter()
        path: str = scope["path"]
        endpoint = ENDPOINTS.get(path) or (
            "receipts" if path.startswith("/v1/receipts/") else "other")
        metrics = self.metrics
        metrics.inflight += 1
        status = 500
        try:
            status = await self._dispatch(scope, receive, send, path, start)
        except asyncio.CancelledError:
            if not (self.svc.status.stopping and await self._stopped(send)):
                raise
            status = 503
        except Exception:  # noqa: BLE001 - a bug must not become a traceback to the caller
            log.exception("internal error", extra={"fields": {"endpoint": endpoint}})
            if endpoint in MODEL_CALLS.values():
                self._called(endpoint, None, 500, "internal_error", start)
            err = GatewayError(500, "internal_error", "internal error", type_="server_error")
            with contextlib.suppress(Exception):  # fails if the response had started
                await respond(send, err.status, err.body(), JSON)
        finally:
            metrics.inflight -= 1
            metrics.request(endpoint, status, time.perf_counter() - start)

    @staticmethod
    async def _stopped(send: Send) -> bool:
        """Answer a request the server cut as it stopped (its grace ran out) 503
        `gateway_stopping`, and absorb the cancel; False if the answer had begun (the
        cancel goes on). A model call with a receipt to write did that first
        (`pipeline.stopped`); this one had none (not yet authenticated or parsed, or not
        a model call)."""
        err = stopping("the gateway is stopping and could not finish this request in time")
        try:
            await respond(send, err.status, err.body(), JSON)
        except Exception:  # noqa: BLE001 - the response had started
            return False
        pipeline.absorb_cancel()
        return True

    def _called(self, kind: str, call: pipeline.Call | None, status: int, code: str | None,
                start: float) -> None:
        """Count a model call, log its one line and, with traces on, record its span."""
        route = call.route.id if call is not None and call.route is not None else ""
        self.metrics.call(kind, route, status, code)
        seconds = time.perf_counter() - start
        receipt_id = call.receipt_id if call is not None else None
        jsonlog.call(receipt_id, kind, route or None, status, code, seconds * 1000,
                     call.e2ee_mode if call is not None else "none",
                     call.stream if call is not None else False)
        if self.tracer is not None:
            self._span(kind, route, status, code, receipt_id, seconds)

    def _span(self, kind: str, route: str, status: int, code: str | None,
              receipt_id: str | None, seconds: float) -> None:
        """One OpenTelemetry span for a finished model call (the same facts as its log line;
        never content)."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        end = time.time_ns()
        attributes = {"pag.kind": kind, "pag.route": route, "pag.receipt_id": receipt_id or "",
                      "pag.code": code or "", "http.response.status_code": status}
        span = self.tracer.start_span(f"pag.{kind}", kind=SpanKind.SERVER,
                                      attributes=attributes,
                                      start_time=end - int(seconds * 1e9))
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, code or ""))
        span.end(end_time=end)

    async def _model_call(self, scope: Scope, receive: Receive, send: Send, kind: str,
                          start: float) -> int:
        try:
            call = await pipeline.model_call(self.svc, scope, receive, send, kind)
        except GatewayError as e:  # refused before a receipt existed (size, Content-Length)
            self._called(kind, None, e.status, e.code, start)
            raise
        if call is None:
            self._called(kind, None, 401, "invalid_api_key", start)
            return 401
        code = call.refusal["code"] if call.refusal else None
        self._called(kind, call, call.status, code, start)
        return call.status

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, path: str,
                        start: float) -> int:
        """Answer one request; its HTTP status."""
        method: str = scope["method"]
        kind = MODEL_CALLS.get(path)
        known_get = path in GETS or path.startswith("/v1/receipts/")
        try:
            if kind is None and any(k in pipeline.E2EE_REQUEST_HEADERS
                                    for k, _ in scope["headers"]):
                raise bad_request("e2ee_unsupported_endpoint",
                                  "E2EE headers were sent to an endpoint without sealed fields")
            if kind is not None:
                if method != "POST":
                    raise GatewayError(405, "method_not_allowed", "use POST")
                return await self._model_call(scope, receive, send, kind, start)
            if method != "GET":
                if known_get:
                    raise GatewayError(405, "method_not_allowed", "use GET")
                raise GatewayError(404, "not_found", "no such endpoint")
            elif path == "/v1/models":
                await respond(send, 200, self._models_body, JSON)
            elif path == "/.well-known/attestation":
                await self._attestation(scope, send)
            elif path.startswith("/v1/receipts/"):
                await self._receipt(path[len("/v1/receipts/"):], scope, send)
            elif path == "/v1/routes":
                await self._routes(scope, send)
            elif path == "/healthz":
                await respond(send, 200, orjson.dumps(
                    {"ok": True, "log_down": self.svc.status.log_down}), JSON)
            elif path == "/readyz":
                return await self._readyz(send)
            elif path == "/openapi.json":
                await respond(send, 200, OPENAPI, JSON, cache=b"no-cache")
            elif path == "/metrics":
                await respond(send, 200, self.metrics.render(self._gauges()), METRICS_TYPE,
                              cache=b"no-store")
            else:
                raise GatewayError(404, "not_found", "no such endpoint")
        except GatewayError as e:
            await respond(send, e.status, e.body(), JSON)
            return e.status
        return 200

    async def _readyz(self, send: Send) -> int:
        ready, checks = await self.readiness.verdict()
        status = 200 if ready else 503
        await respond(send, status, orjson.dumps({"ready": ready, "checks": checks}), JSON,
                      cache=b"no-store")
        return status

    def _gauges(self) -> list[Gauge]:
        """The state metrics, sampled now (outbox counts at most COUNTS_TTL old)."""
        now = time.monotonic()
        if now - self._counts[0] >= COUNTS_TTL:
            self._counts = (now, self.svc.outbox.counts())
        total, unlogged = self._counts[1]
        book = self.svc.routes
        status = self.svc.status
        outbox = self.svc.outbox
        return [
            Gauge("route_lease_state", "1 for the current lease state of each route",
                  [((("route", r.id), ("state", s)), float(book.state[r.id].state == s))
                   for r in book.routes for s in LEASE_STATES]),
            Gauge("outbox_receipts", "receipts committed to the outbox", [((), total)]),
            Gauge("outbox_unlogged", "receipts the log has not acknowledged yet",
                  [((), unlogged)]),
            Gauge("log_down", "1 while the receipt shipper cannot reach the log",
                  [((), float(status.log_down))]),
            Gauge("outbox_bytes", "bytes the outbox and ledger files use (less free pages)",
                  [((), outbox.bytes_used())]),
            Gauge("outbox_max_bytes", "the configured bound: calls are refused 503 "
                  "outbox_full at it", [((), outbox.max_bytes)]),
            Gauge("outbox_near_bound", "1 once outbox_bytes passed 80% of outbox_max_bytes "
                  "(alarm)", [((), float(outbox.near_bound()))]),
            Gauge("outbox_failing", "1 while the outbox's last write failed (storage fault)",
                  [((), float(outbox.failing is not None))]),
            Gauge("build_info", "the running version", [((("version", version()),), 1)]),
        ]

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
        client = scope.get("client") or ("", 0)
        doc = dict(await self.attestations.document(nonce, str(client[0])))
        doc["keyset_index"] = self.svc.keyset_index  # where the log holds this keyset
        if self.keyset_proof is not None:  # and the proof, so a client checks it without the log
            doc["keyset_proof"] = self.keyset_proof
        await respond(send, 200, orjson.dumps(doc), JSON, cache=b"no-store")

    async def _receipt(self, rest: str, scope: Scope, send: Send) -> None:
        """A receipt and its proof. By id: only for the API key that made the call (any other
        key, or an unknown id, is the same 404). By request hash: no key, because the salted
        hash is a capability only the caller can compute (docs/receipts.md)."""
        outbox, index = self.svc.outbox, self.svc.receipt_index
        found: Indexed | None = None
        if rest.startswith("by-request-hash/"):
            h = rest[len("by-request-hash/"):]
            if not HEX64.fullmatch(h):
                raise bad_request("invalid_request_hash",
                                  "request hash must be 64 lower-case hex digits")
            row = outbox.by_request_hash(h)
            if row is None and index is not None:
                found = await index.by_request_hash(h)
        else:
            key = self.svc.keys.lookup(header(scope, b"authorization"))
            if key is None:
                raise unauthorized("the API key that made the call is required")
            valid = RECEIPT_ID.fullmatch(rest) is not None
            row = outbox.get(rest) if valid else None
            if row is None and index is not None and valid:
                found = await index.get(rest)  # signed by another replica
            owner = row.key_sha256 if row is not None else \
                found.key_sha256 if found is not None else None
            if owner is None or not hmac.compare_digest(owner, key.sha256):
                row = found = None
        if row is not None:
            entry, proof_text, log_index = row.entry, row.proof, row.log_index
        elif found is not None:
            entry, proof_text, log_index = found.entry, None, None
            if self._proofs is not None and self.log_http is not None:
                logged = await logged_proof(self.log_http, str(self.svc.cfg.log.url),
                                            self._proofs, found.entry, found.request_hash)
                if logged is not None:
                    log_index, proof_text = logged
        else:
            raise GatewayError(404, "receipt_not_found", "no such receipt")
        body = b'{"receipt":' + entry + b',"proof":' + orjson.dumps(proof_text) + \
            b',"index":' + orjson.dumps(log_index) + \
            b',"log":' + orjson.dumps(self.svc.cfg.log.url) + b"}"  # where to read the log
        await respond(send, 200, body, JSON)

    async def _routes(self, scope: Scope, send: Send) -> None:
        if not admin_ok(header(scope, b"authorization"), self.svc.cfg.gateway.admin_key_sha256):
            raise GatewayError(401, "invalid_admin_key", "admin key required",
                               type_="authentication_error")
        book = self.svc.routes
        for r in book.routes:
            with contextlib.suppress(GatewayError):
                await book.acquire(r)
        total, pending = self.svc.outbox.counts()
        status = self.svc.status
        await respond(send, 200, orjson.dumps({
            "routes": [book.view(r) for r in book.routes], "receipts": total,
            "unlogged": pending, "log_down": status.log_down,
            "log_last_error": status.last_error}), JSON)
