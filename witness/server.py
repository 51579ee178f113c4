"""The C2SP tlog-witness HTTP API (ASGI): POST /add-checkpoint and GET /.

A checkpoint is cosigned only if it is signed by the configured key for its
origin and is consistent with the last checkpoint this witness cosigned for
that origin; the new size and root are durable before the answer is sent.
Every refusal but the 409 (whose body C2SP fixes) is JSON `{"error", "code"}`;
GET /openapi.json describes the API. For operators: GET /metrics (witness/metrics.py), GET /healthz (the process
answers), GET /readyz (the state database answers and is the one opened,
the key signs: 200, else 503 naming what failed).

When the state database cannot be read or written (disk full, read-only,
I/O error), every request that needs it is answered 503 JSON `{"error",
"code": "storage_unavailable"}` with `Retry-After`: no cosignature is ever
given without the new size durably stored, and the witness answers again as
soon as the database does.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlog import checkpoint, merkle, note
from tlog.service import (
    JSON,
    METRICS_TEXT,
    Probe,
    Receive,
    Scope,
    Send,
    observed,
    read_body,
    refuse,
    respond,
)
from witness import cosignature, request
from witness.metrics import WitnessMetrics
from witness.state import State, StateError

OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()
"""The OpenAPI 3 description of this API, written by hand (served at GET /openapi.json)."""
READS = ("/", "/forks", "/metrics", "/healthz", "/readyz", "/openapi.json")

PING_TIMEOUT = 3.0
"""Seconds /readyz waits for the state database to answer."""

STORAGE_UNAVAILABLE = "storage_unavailable"
"""The code of a 503: the state database failed, nothing was stored or cosigned."""

CRASH_AFTER_PERSIST = "PAG_WITNESS_CRASH_AFTER_PERSIST"
"""Test hook: exit the process right after persisting, before answering."""


@dataclass(frozen=True)
class Refusal:
    """An add-checkpoint refusal: HTTP status, body and content type."""

    status: int
    body: bytes
    ctype: bytes = JSON


def refusal(status: int, code: str, reason: str) -> Refusal:
    """A refusal with the JSON body every service answers `{"error": reason, "code": code}`
    (the 409 alone has the body C2SP fixes: the size and a newline)."""
    return Refusal(status, json.dumps({"error": reason, "code": code}).encode())


class Witness:
    """The add-checkpoint rules over a State and a cosigner."""

    def __init__(self, state: State, signer: cosignature.CosignatureSigner,
                 logs: dict[str, note.Ed25519Verifier]) -> None:
        self.state = state
        self.signer = signer
        self.logs = logs
        self._locks: dict[str, asyncio.Lock] = {}
        self.cosigned: collections.Counter[str] = collections.Counter()
        """Checkpoints cosigned since start, by (configured) origin."""

    async def add_checkpoint(self, body: bytes) -> bytes | Refusal:
        """Cosignature line(s) for a valid, consistent checkpoint, or a Refusal."""
        try:
            req = request.parse(body)
            text, _ = note.split(req.checkpoint)
            cp = checkpoint.parse(text)
        except (request.RequestError, note.NoteError, checkpoint.CheckpointError) as e:
            return refusal(400, "malformed_request", f"malformed request: {e}")
        verifier = self.logs.get(cp.origin)
        if verifier is None:
            return refusal(404, "unknown_origin", "unknown log origin")
        try:
            checkpoint.open(req.checkpoint, verifier)
        except checkpoint.CheckpointError:
            return refusal(403, "bad_signature", "no valid signature from the log's key")
        if req.old_size > cp.size:
            return refusal(400, "malformed_request", "old size exceeds the checkpoint size")
        lock = self._locks.setdefault(cp.origin, asyncio.Lock())
        async with lock:
            refused = await asyncio.to_thread(self._check_and_store, req, cp)
            if refused is not None:
                return refused
            if os.environ.get(CRASH_AFTER_PERSIST):
                os._exit(137)
            self.cosigned[cp.origin] += 1
            return cosignature.cosign(req.checkpoint, self.signer).line()

    def _check_and_store(self, req: request.AddCheckpoint,
                         cp: checkpoint.Checkpoint) -> Refusal | None:
        """Store `cp` as the origin's state if it is consistent with the stored one (None),
        else the Refusal. In a worker thread: the read, the proof check and the fsynced
        compare-and-swap cost a request one hand-off, not one per database call."""
        stored = self.state.get(cp.origin)
        size0, root0 = stored
        if req.old_size != size0:
            return Refusal(409, f"{size0}\n".encode(), request.SIZE_CONTENT_TYPE.encode())
        if req.old_size == 0:
            if req.proof:
                return refusal(422, "bad_proof", "a proof from size 0 must be empty")
            if cp.size == 0 and cp.root_hash != merkle.EMPTY_ROOT:
                return refusal(422, "bad_empty_root",
                               "the empty tree's root must be SHA-256 of nothing")
            if root0 is not None and cp.size == 0 and root0 != cp.root_hash:
                return refusal(422, "fork", "fork at size 0")
        elif req.old_size == cp.size:
            if req.proof:
                return refusal(422, "bad_proof", "the proof between equal sizes must be empty")
            if cp.root_hash != root0:
                self.state.record_fork(cp.origin, cp.size, self.state.note(cp.origin) or b"",
                                       req.checkpoint)
                return refusal(422, "fork", "fork: same size, different root")
        else:
            assert root0 is not None  # noqa: S101 - type narrowing: old 0 (no root yet) is handled above
            try:
                merkle.verify_consistency(req.old_size, cp.size, list(req.proof), root0, cp.root_hash)
            except merkle.ProofError as e:
                return refusal(422, "bad_proof", f"consistency proof: {e}")
        if not self.state.advance(cp.origin, stored, cp.size, cp.root_hash, req.checkpoint):
            size_now, _ = self.state.get(cp.origin)
            return Refusal(409, f"{size_now}\n".encode(), request.SIZE_CONTENT_TYPE.encode())
        return None

    def status(self) -> dict[str, Any]:
        logs = []
        for origin, v in sorted(self.logs.items()):
            size, root = self.state.get(origin)
            logs.append({"origin": origin, "vkey": v.vkey, "size": size,
                         "root": root.hex() if root else None})
        return {"name": self.signer.name, "vkey": self.signer.vkey, "logs": logs,
                "forks": self.state.fork_count()}


class WitnessApp:
    """ASGI wrapper around a Witness."""

    def __init__(self, witness: Witness) -> None:
        self.witness = witness
        self.metrics = WitnessMetrics(witness)
        self._handle = observed(self._dispatch, self.metrics.record)
        self._state_probe = Probe(witness.state.ping, PING_TIMEOUT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except StateError as e:
            if scope["path"] == "/add-checkpoint":
                self.metrics.refusals.labels("503").inc()
            await refuse(send, 503, STORAGE_UNAVAILABLE, f"witness state unavailable: {e}",
                         [(b"retry-after", b"1")])

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/add-checkpoint":
            if method != "POST":
                return await refuse(send, 405, "method_not_allowed", "use POST")
            body = await read_body(scope, receive, request.MAX_BODY)
            if body is None:
                return await refuse(send, 400, "malformed_request", "body too large")
            result = await self.witness.add_checkpoint(body)
            if isinstance(result, Refusal):
                self.metrics.refusals.labels(str(result.status)).inc()
                return await respond(send, result.status, result.body, result.ctype)
            return await respond(send, 200, result)
        if path == "/" and method in ("GET", "HEAD"):
            return await respond(send, 200, json.dumps(self.witness.status()).encode(),
                               b"application/json")
        if path == "/forks" and method in ("GET", "HEAD"):
            return await respond(send, 200, json.dumps(self.witness.state.forks()).encode(),
                               b"application/json")
        if path == "/metrics" and method in ("GET", "HEAD"):
            return await respond(send, 200, self.metrics.render(), METRICS_TEXT, b"no-store")
        if path == "/healthz" and method in ("GET", "HEAD"):
            return await respond(send, 200, b'{"alive": true}', b"application/json")
        if path == "/readyz" and method in ("GET", "HEAD"):
            return await self._readyz(send)
        if path == "/openapi.json" and method in ("GET", "HEAD"):
            return await respond(send, 200, OPENAPI, JSON, b"no-cache")
        if path in READS:
            return await refuse(send, 405, "method_not_allowed", "use GET")
        await refuse(send, 404, "not_found", "no such endpoint")

    async def _readyz(self, send: Send) -> None:
        """200 only if the state database answers now and the key signs and verifies."""
        checks = {"state": await self._state_probe(), "key": "ok"}
        signer = self.witness.signer
        if not signer.verifier().verify(b"readyz\n", signer.sign(b"readyz\n")):
            checks["key"] = "the witness key does not verify its own signature"
        ready = all(v == "ok" for v in checks.values())
        await respond(send, 200 if ready else 503,
                      json.dumps({"ready": ready, "checks": checks}).encode(),
                      b"application/json", b"no-store")
