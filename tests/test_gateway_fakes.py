"""Test doubles for the gateway tests: a fake OpenAI provider, a fake lease store,
a fake C2SP log (`POST /add` with real proofs), and an in-process gateway runner.

This module holds no tests; the gateway test modules import it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from gateway.api import config as gconfig
from gateway.api import server
from gateway.api.apikeys import hash_key
from gateway.api.app import Gateway
from gateway.api.errors import MALFORMED
from gateway.api.health import Readiness
from gateway.api.routes import now_rfc3339
from gateway.receipts import keysets
from gateway.receipts.logclient import LogClient
from gateway.receipts.outbox import Outbox, ReceiptSigner
from gateway.receipts.shipper import LogStatus, Shipper
from gateway.upstream.leases import Leases, LeaseSource
from tlog import checkpoint, merkle, note, proof, tiles
from tlog.service import StopSignal, uvicorn_config
from verifier.tee.keyset import keyset_hash
from witness import cosignature

API_KEY = "sk-test-key"
ADMIN_KEY = "admin-test-key"
MARKER = "PROMPT-MARKER-7f3c9a-should-never-be-logged"
# The completion the verification tests' providers answer every chat call with.
OK_COMPLETION = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
COMPLETION = "COMPLETION-MARKER-51d2-secret-answer"


def tls_server_context(tmp: Path, ip: str | None = None) -> tuple[ssl.SSLContext, str]:
    """A TLS server context with a fresh self-signed key in TMP/tls.crt and tls.key;
    (context, SPKI SHA-256 hex). With `ip`, the certificate names that address and is a
    CA, so a client that trusts TMP/tls.crt verifies it as that host's."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "provider.test")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if ip is not None:
        builder = (builder.add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                  critical=True))
    cert = builder.sign(key, hashes.SHA256())
    (tmp / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return ctx, hashlib.sha256(spki).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeProvider:
    """An OpenAI-compatible provider recording the exact bytes it received and sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.sent: list[bytes] = []
        self.fail_status: int | None = None
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.tls: ssl.SSLContext | None = None
        self.break_stream = False
        self.stream_pause = 0.0  # seconds a stream pauses before its last word
        self.usage_on_chunks = False  # "usage": null on every chunk when usage is asked for

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop serving; stopping twice is harmless (a test may stop it mid-run)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status:
            return web.Response(status=self.fail_status, body=b'{"error":"boom"}',
                                content_type="application/json")
        req = json.loads(body)
        model = req["model"]
        if req.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            sent = b""
            words = [COMPLETION, " and", " more"]
            for i, w in enumerate(words):
                if self.break_stream and i == 2:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if self.stream_pause and i == 2:
                    await asyncio.sleep(self.stream_pause)
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": w},
                                      "finish_reason": None if i < 2 else "stop"}]}
                if self.usage_on_chunks and (req.get("stream_options") or {}).get(
                        "include_usage"):
                    chunk["usage"] = None
                data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                sent += data
                await resp.write(data)
            if (req.get("stream_options") or {}).get("include_usage"):
                data = b"data: " + json.dumps({"id": "c1", "choices": [], "usage": {
                    "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode() \
                    + b"\n\n"
                sent += data
                await resp.write(data)
            sent += b"data: [DONE]\n\n"
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.sent.append(sent)
            return resp
        out = json.dumps({"id": "c1", "object": "chat.completion", "model": model, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": COMPLETION},
             "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()
        self.sent.append(out)
        return web.Response(body=out, content_type="application/json")

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(body)
        req = json.loads(body)
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        out = json.dumps({"object": "list", "model": req["model"], "data": [
            {"object": "embedding", "index": i, "embedding": [0.25, -0.5, float(i)]}
            for i in range(len(inputs))],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode()
        self.sent.append(out)
        return web.Response(body=out, content_type="application/json")


class RecordingProvider:
    """Base of the verification tests' providers: its chat endpoint records every body it
    receives and answers OK_COMPLETION; a subclass serves its own evidence and starts
    `self.runner`."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        self.received.append(await request.read())
        return web.Response(body=OK_COMPLETION, content_type="application/json")

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class FakeVerificationError(Exception):
    """Stands in for gateway.verification's VerificationError(code, reason)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass
class FakeLease:
    lease_id: str
    verified: bool = True
    evidence: str = "dstack"
    binding: str = "none"
    verified_at: float = field(default_factory=time.time)
    expires_at: float = field(default_factory=lambda: time.time() + 300)


class FakeLeaseStore:
    """Per-route outcome: a lease, or the VerificationError to raise."""

    def __init__(self) -> None:
        self.outcomes: dict[str, FakeLease | FakeVerificationError] = {}
        self.calls: list[str] = []

    async def ensure(self, route: gconfig.RouteSpec, now: float) -> FakeLease:
        self.calls.append(route.id)
        out = self.outcomes.get(route.id, FakeLease(f"lease-{route.id}"))
        if isinstance(out, Exception):
            raise out
        return out

    async def invalidate(self, route: gconfig.RouteSpec, lease_id: str) -> None:
        self.calls.append(f"invalidate:{route.id}:{lease_id}")


class FakeLog:
    """`POST /add` with bearer auth, answering with a real, verifiable tlog-proof;
    `GET /checkpoint` and `GET /proof/{request_hash}` too. With a `witness`, every
    checkpoint carries its cosignature while `cosign` is true."""

    def __init__(self, token: str = "append-token", batch_refusals: bool = False,
                 witness: cosignature.CosignatureSigner | None = None,
                 old_batches: bool = False) -> None:
        self.token = token
        self.batch_refusals = batch_refusals  # serve /add-batch, acknowledging no entry
        self.old_batches = old_batches  # serve /add-batch, each answer as /add's (no compact)
        self.batch_accepts: list[str] = []  # the Accept header of each /add-batch
        self.batch_starts: list[float] = []  # the loop's time each (old-style) /add-batch came
        self.batch_delay = 0.0  # seconds each (old-style) /add-batch takes
        self.batches_in_flight = self.most_batches_in_flight = 0
        self.witness = witness
        self.cosign = True
        self.signer = note.generate_signer("fake.log/test")
        self.entries: list[bytes] = []
        self.leaves: list[bytes] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None
        self.fail = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def vkey(self) -> str:
        return self.signer.vkey

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/add", self._add)
        app.router.add_get("/checkpoint", self._checkpoint)
        app.router.add_get("/proof/{h}", self._proof)
        if self.batch_refusals:
            app.router.add_post("/add-batch", self._refuse_batch)
        elif self.old_batches:
            app.router.add_post("/add-batch", self._old_batch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _refuse_batch(self, request: web.Request) -> web.Response:
        n = len(tiles.decode_bundle(await request.read()))
        return web.json_response({"entries": [{"error": "not now"}] * n})

    async def _old_batch(self, request: web.Request) -> web.Response:
        """Every entry appended; the answer of a log that ignores the compact ask."""
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        self.batch_accepts.append(request.headers.get("Accept", ""))
        self.batch_starts.append(asyncio.get_running_loop().time())
        self.batches_in_flight += 1
        self.most_batches_in_flight = max(self.most_batches_in_flight, self.batches_in_flight)
        try:
            await asyncio.sleep(self.batch_delay)
        finally:
            self.batches_in_flight -= 1
        start = len(self.entries)
        for entry in tiles.decode_bundle(await request.read()):
            self.entries.append(entry)
            self.leaves.append(merkle.leaf_hash(entry))
        proofs = [self.prove(i) for i in range(start, len(self.entries))]
        return web.json_response({"entries": [
            {"index": p.index, "checkpoint": p.checkpoint.decode(), "proof": p.format().decode()}
            for p in proofs]})

    async def _add(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        if self.fail:
            return web.Response(status=503)
        entry = await request.read()
        self.entries.append(entry)
        self.leaves.append(merkle.leaf_hash(entry))
        p = self.prove(len(self.entries) - 1)
        return web.json_response({"index": p.index, "checkpoint": p.checkpoint.decode(),
                                  "proof": p.format().decode()})

    def signed_checkpoint(self) -> bytes:
        """The current checkpoint, signed (and cosigned when the witness is on)."""
        cp = checkpoint.Checkpoint("fake.log/test", len(self.leaves), merkle.root(self.leaves),
                                   ())
        signed = checkpoint.sign(cp, self.signer)
        if self.witness is not None and self.cosign:
            signed += cosignature.cosign(signed, self.witness).line()
        return signed

    def prove(self, index: int) -> proof.TlogProof:
        """The proof of entry `index` under the current checkpoint."""
        size = len(self.leaves)
        return proof.TlogProof(index, tuple(merkle.inclusion_proof(index, size, self.leaves)),
                               self.signed_checkpoint(), self.entries[index])

    async def _checkpoint(self, request: web.Request) -> web.Response:
        if self.fail:
            return web.Response(status=503)
        return web.Response(body=self.signed_checkpoint(), content_type="text/plain",
                            charset="utf-8")

    async def _proof(self, request: web.Request) -> web.Response:
        want = request.match_info["h"]
        for i, entry in enumerate(self.entries):
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(entry).get("request_hash") == want:
                    return web.Response(body=self.prove(i).format(), content_type="text/plain")
        return web.Response(status=404)


@dataclass
class LogRef:
    """Where a log listens, its append token and verifier key (fake or real tlog)."""

    url: str
    token: str
    vkey: str


def write_config(tmp: Path, provider_url: str, *, log: FakeLog | LogRef | None = None,
                 extra_gateway: str = "", routes: str | None = None,
                 rpm: int = 0, budget: int = 0) -> Path:
    """A config file with chat routes r1 (priority 0) and r2 (priority 1) and embeddings."""
    token = tmp / "append.token"
    if log is not None:
        token.write_text(log.token + "\n")
    log_table = (f'[log]\nurl = "{log.url}"\ntoken_file = "append.token"\nvkey = "{log.vkey}"\n'
                 if log is not None else "")
    witness = getattr(log, "witness", None)
    if witness is not None:
        log_table += f'witness_vkeys = ["{witness.vkey}"]\nquorum = 1\n'

    routes = routes if routes is not None else f"""
[[routes]]
id = "r1"
model = "chat-model"
aliases = ["gpt-4o-mini"]
provider = "p1"
base_url = "{provider_url}"
upstream_model = "upstream-chat-1"
priority = 0
evidence = "dstack"
policy = {{ allow_any_workload = true }}

[[routes]]
id = "r2"
model = "chat-model"
provider = "p2"
base_url = "{provider_url}"
upstream_model = "upstream-chat-2"
priority = 1
evidence = "dstack"
policy = {{ app_id = "{'ab' * 20}" }}

[[routes]]
id = "e1"
model = "embed-model"
provider = "p1"
base_url = "{provider_url}"
upstream_model = "upstream-embed"
kind = "embeddings"
"""
    text = f"""
[gateway]
name = "test"
max_body_bytes = 4096
data_dir = "data"
admin_key_sha256 = "{hash_key(ADMIN_KEY)}"
{extra_gateway}

{log_table}

[[api_keys]]
name = "test"
sha256 = "{hash_key(API_KEY)}"
requests_per_minute = {rpm}
token_budget = {budget}
{routes}
"""
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


@dataclass
class Running:
    """A gateway served by uvicorn in this event loop."""

    app: Gateway
    url: str
    receipt_key: Ed25519PrivateKey
    e2ee_key: X25519PrivateKey
    store: LeaseSource
    shipper: Shipper | None
    keyset_index: int
    log_client: LogClient | None


IDENTITY = {"app_id": "ab" * 20, "compose_hash": "cd" * 32, "keyset_hash": "ef" * 32}


@dataclass
class FakeIdentity:
    """A gateway identity without a TEE: the keyset of the given keys, an attestation
    document without a real quote, and (with a log) its keyset entry logged."""

    identity: dict[str, str]
    keyset_index: int
    log_client: LogClient | None
    keyset: dict[str, str] = field(default_factory=dict)

    async def attest(self, nonce: str | None) -> dict[str, Any]:
        doc = {"quote": "00", "event_log": "[]", "simulated": True, "keyset": self.keyset,
               "keyset_hash": self.identity["keyset_hash"], "app_id": self.identity["app_id"],
               "compose_hash": self.identity["compose_hash"]}
        if nonce is not None:
            doc["nonce"] = nonce
        return doc


async def fake_identity(cfg: gconfig.Config, rk: Ed25519PrivateKey,
                        ek: X25519PrivateKey) -> FakeIdentity:
    """The identity of a test gateway; its keyset entry is appended when a log is set."""
    keyset = {"receipt_signing_key": b64(rk.public_key().public_bytes_raw()),
              "e2ee_public_key": b64(ek.public_key().public_bytes_raw()),
              "tls_spki_sha256": "00" * 32, "log_vkey": cfg.log.vkey or ""}
    fake = FakeIdentity(dict(IDENTITY, keyset_hash=keyset_hash(keyset)), 0, None, keyset)
    if cfg.log.url:
        fake.log_client = server.log_client(cfg)
        rec = await keysets.ensure_logged(fake.log_client, fake.attest,
                                          fake.identity["keyset_hash"], cfg.log.vkey or "",
                                          cfg.gateway.data_dir, now_rfc3339)
        fake.keyset_index = rec.index
    return fake


@contextlib.asynccontextmanager
async def run_gateway(cfg_path: Path, store: LeaseSource | None = None,
                      error_type: type[Exception] = FakeVerificationError,
                      readiness: Callable[[Outbox], Readiness] | None = None
                      ) -> AsyncIterator[Running]:
    """Start the gateway app on a free port; stop it (and close its outbox) on exit.

    `store` grants leases (a `FakeLeaseStore` unless given: the verification tests
    pass the real one, with its `VerificationError` as `error_type`); `readiness` builds
    the app's /readyz checks from its outbox (default: the app's own)."""
    cfg = gconfig.load(cfg_path)
    rk = Ed25519PrivateKey.generate()
    ek = X25519PrivateKey.generate()
    store = store or FakeLeaseStore()
    g = cfg.gateway
    outbox = Outbox(g.data_dir, g.outbox_durability, max_bytes=g.outbox_max_bytes,
                    retention=g.receipt_retention_seconds)
    token = cfg.log.token_file.read_text().strip() if cfg.log.token_file else None
    shipper = Shipper(cfg.gateway.data_dir, cfg.log.url, token, cfg.log.vkey,
                      concurrency=8, witnesses=cfg.log.witness_vkeys,
                      quorum=cfg.log.quorum, max_bytes=g.outbox_max_bytes) if cfg.log.url else None
    status = LogStatus(outbox, shipper is not None)
    ident = await fake_identity(cfg, rk, ek)
    app = Gateway(cfg, signer=ReceiptSigner(rk), identity=ident.identity, outbox=outbox,
                  status=status, leases=Leases(store, error_type),
                  attest=ident.attest, keyset_index=ident.keyset_index,
                  e2ee_key=ek.private_bytes_raw(),
                  readiness=readiness(outbox) if readiness is not None else None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets
    # TCP_NODELAY only on sockets whose proto is TCP (else Nagle adds 40 ms per response)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, cfg.server, MALFORMED, lifespan="on",
                                           log_level="warning", access_log=False))
    if shipper is not None:
        await shipper.start()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield Running(app, f"http://127.0.0.1:{port}", rk, ek, store, shipper,
                      ident.keyset_index, ident.log_client)
    finally:
        server.should_exit = True
        await task
        sock.close()
        if shipper is not None:
            await shipper.close()
        if ident.log_client is not None:
            await ident.log_client.close()
        outbox.close()


@dataclass
class Stack:
    """A fake provider, an optional fake log, a gateway routed to them, and a client."""

    prov: FakeProvider
    log: FakeLog | None
    gw: Running
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.gw.url


@contextlib.asynccontextmanager
async def gateway_stack(tmp: Path, *, log: bool = False,
                        store: FakeLeaseStore | None = None, tls: ssl.SSLContext | None = None,
                        routes: Callable[[str], str] | None = None, timeout: float = 5.0,
                        extra_gateway: str = "", rpm: int = 0, budget: int = 0
                        ) -> AsyncIterator[Stack]:
    """The one set-up of the gateway HTTP tests: start a `FakeProvider` (over `tls` if
    given) and, with `log`, a `FakeLog` (running: the gateway listens only once its keyset
    entry is logged); write the config in `tmp` (`routes` builds the route tables from the
    provider's base URL); serve the gateway and open a client. Everything is stopped on exit, even on failure."""
    prov = FakeProvider()
    fake_log = FakeLog() if log else None
    await prov.start(tls=tls)
    try:
        if fake_log is not None:
            await fake_log.start()
        cfg = write_config(tmp, prov.base_url, log=fake_log, extra_gateway=extra_gateway,
                           routes=routes(prov.base_url) if routes else None,
                           rpm=rpm, budget=budget)
        async with run_gateway(cfg, store) as gw, httpx.AsyncClient(timeout=timeout) as client:
            yield Stack(prov, fake_log, gw, client)
    finally:
        await prov.stop()
        if fake_log is not None:
            await fake_log.stop()


async def post_chat(url: str, *, stream: bool | None = None) -> httpx.Response:
    """One chat call to the gateway at `url` with the test API key; the prompt is MARKER
    (`stream` is sent only when given)."""
    body: dict[str, Any] = {"model": "chat-model",
                            "messages": [{"role": "user", "content": MARKER}]}
    if stream is not None:
        body["stream"] = stream
    async with httpx.AsyncClient(timeout=30) as c:
        return await c.post(f"{url}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {API_KEY}"}, json=body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve_main(argv: list[str]) -> None:
    """`python -m tests.test_gateway_fakes CONFIG PORT`: the gateway with fake keys and
    leases, but the real outbox, shipper process (restarted if it dies, as by `gateway
    serve`) and uvicorn serving, stopped as `gateway serve` stops (for kill -9 and SIGTERM
    tests)."""
    import uvloop

    cfg = gconfig.load(argv[0])
    StopSignal()  # SIGTERM: uvicorn stops, the outbox is closed, exit 0

    async def main() -> None:
        rk, ek = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        ident = await fake_identity(cfg, rk, ek)
        outbox = server.open_outbox(cfg)
        status = LogStatus(outbox, bool(cfg.log.url))
        shipper = server.start_shipper(cfg, outbox, status)
        app = Gateway(cfg, signer=ReceiptSigner(rk), identity=ident.identity, outbox=outbox,
                      status=status,
                      leases=Leases(FakeLeaseStore(), FakeVerificationError),
                      attest=ident.attest, keyset_index=ident.keyset_index)
        srv = server.draining_server(
            uvicorn_config(app, cfg.server, MALFORMED, host="127.0.0.1", port=int(argv[1]),
                           lifespan="on", log_level="warning", access_log=False, loop="none",
                           timeout_graceful_shutdown=cfg.gateway.shutdown_grace),
            status)  # stopped as `gateway serve` is

        async def watchdog() -> None:  # as `gateway serve`: a shipper that died is restarted
            nonlocal shipper
            while shipper is not None:
                await asyncio.sleep(0.5)
                if shipper.poll() is not None:
                    shipper = server.start_shipper(cfg, outbox, status)

        watch = asyncio.create_task(watchdog())
        try:
            await srv.serve()
        finally:
            watch.cancel()
            server.stop_process(shipper)
            outbox.close()

    uvloop.run(main())


if __name__ == "__main__":
    import sys

    serve_main(sys.argv[1:])
