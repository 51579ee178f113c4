"""The log's HTTP API as a plain ASGI app (run by uvicorn).

GET /checkpoint, GET /tile/..., GET /tile/entries/..., POST /add,
POST /add-batch (an extension: many entries, one request), GET
/proof/{request_hash}, GET /consistency?old=M&new=N, GET / (status), and
for operators GET /metrics (tlog/metrics.py), GET /healthz (the process
answers) and GET /readyz (storage answers now, the served checkpoint is
signed by the loaded key: 200, else 503 naming what failed).
Every malformed request is a 4xx JSON `{"error", "code"}` (`tlog.service.refuse`);
GET /openapi.json describes the whole API.
What the log cannot do right now is a 503 JSON `{"error", "code"}` with
`Retry-After`: an append not acknowledged (the codes of
tlog/sequencer.py: `storage_unavailable`, `quorum_not_reached`,
`not_sequencer` naming the sequencer, `shutting_down`; sending the same
entry again is safe, appends are idempotent), or a read the storage could
not answer (`storage_unavailable`).
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs

import orjson

from tlog import batch, checkpoint, merkle, tiles
from tlog.metrics import LogMetrics
from tlog.sequencer import (
    SEQUENCER,
    STORAGE_UNAVAILABLE,
    Added,
    AppendError,
    Log,
    NotSequencer,
)
from tlog.service import (
    JSON,
    METRICS_TEXT,
    TEXT,
    Probe,
    Receive,
    Scope,
    Send,
    observed,
    read_body,
    refuse,
    respond,
)
from tlog.storage import StorageError

OCTETS = b"application/octet-stream"
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()
"""The OpenAPI 3 description of this API, written by hand (served at GET /openapi.json)."""
IMMUTABLE = b"public, max-age=31536000, immutable"
HEX64 = re.compile(r"[0-9a-f]{64}")
PING_TIMEOUT = 3.0
"""Seconds /readyz waits for storage to answer."""


class TlogApp:
    """ASGI app over a started `Log`."""

    def __init__(self, log: Log, token: str, max_entry: int = tiles.MAX_ENTRY) -> None:
        if not 0 < max_entry <= tiles.MAX_ENTRY:
            raise ValueError("max entry size must be 1..65535")
        self.log = log
        self._auth = f"Bearer {token}".encode()
        self.max_entry = max_entry
        self.metrics = LogMetrics(log)
        self._handle = observed(self._dispatch, self.metrics.record)
        self._storage_probe = Probe(log.store.ping, PING_TIMEOUT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except StorageError as e:  # a read the store could not answer now
            await _unavailable(send, STORAGE_UNAVAILABLE, f"log storage unavailable: {e}")

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path in ("/add", "/add-batch"):
            if method != "POST":
                return await refuse(send, 405, "method_not_allowed", "use POST")
            if path == "/add":
                return await self._add(scope, receive, send)
            return await self._add_batch(scope, receive, send)
        if method not in ("GET", "HEAD"):
            return await refuse(send, 405, "method_not_allowed", "use GET")
        if path == "/checkpoint":
            return await respond(send, 200, self.log.served.note, TEXT, b"no-cache")
        if path.startswith("/tile/"):
            return await self._tile(path[1:], send)
        if path.startswith("/proof/"):
            return await self._proof(path[len("/proof/"):], send)
        if path == "/consistency":
            return await self._consistency(scope, send)
        if path == "/":
            body = json.dumps({"origin": self.log.origin, "size": self.log.served.size,
                               "vkey": self.log.signer.vkey, "role": self.log.role,
                               "sequencer": self.log.sequencer_url}).encode()
            return await respond(send, 200, body, JSON, b"no-cache")
        if path == "/metrics":
            return await respond(send, 200, self.metrics.render(), METRICS_TEXT, b"no-store")
        if path == "/healthz":
            return await _json(send, 200, {"alive": True})
        if path == "/readyz":
            return await self._readyz(send)
        if path == "/openapi.json":
            return await respond(send, 200, OPENAPI, JSON, b"no-cache")
        await refuse(send, 404, "not_found", "no such endpoint")

    async def _readyz(self, send: Send) -> None:
        """200 only if storage answers now and the served checkpoint verifies under our key."""
        checks = {"storage": await self._storage_probe(), "checkpoint": "ok"}
        try:
            checkpoint.open(self.log.served.note, self.log.signer.verifier())
        except checkpoint.CheckpointError as e:
            checks["checkpoint"] = f"the served checkpoint does not verify: {e}"
        ready = all(v == "ok" for v in checks.values())
        await _json(send, 200 if ready else 503,
                    {"ready": ready, "checks": checks, "role": self.log.role,
                     "size": self.log.served.size})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await self.log.start()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.log.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _add(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(auth, self._auth):
            return await refuse(send, 401, "unauthorized", "missing or wrong bearer token")
        body = await read_body(scope, receive, self.max_entry)
        if body is None:
            return await refuse(send, 413, "entry_too_large",
                                f"entry larger than {self.max_entry} bytes")
        if not body:
            return await refuse(send, 400, "empty_entry", "empty entry")
        started = time.perf_counter()
        try:
            added = await self.log.add(body)
        except NotSequencer as e:
            return await _not_sequencer(send, e.sequencer)
        except AppendError as e:
            return await _unavailable(send, e.code, str(e))
        self.metrics.append_seconds.observe(time.perf_counter() - started)
        await _json(send, 200, {"index": added.index, "checkpoint": added.checkpoint.decode(),
                                "proof": added.proof.decode()})

    async def _add_batch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Body: up to 256 entries in entry-bundle encoding (2-byte big-endian length, bytes).

        Answers 200 `{"entries": [...]}` in order, each either what `POST /add`
        answers for that entry (`index`, `checkpoint`, `proof`) or `{"error"}`
        when that entry was not acknowledged (the client sends it again). With
        `Accept: application/vnd.pag.batch-proof+json`, the compact answer of
        tlog/batch.py: one checkpoint, each entry's index, one proof of them all.
        """
        headers = dict(scope["headers"])
        if not hmac.compare_digest(headers.get(b"authorization", b""), self._auth):
            return await refuse(send, 401, "unauthorized", "missing or wrong bearer token")
        body = await read_body(scope, receive, tiles.WIDTH * (self.max_entry + 2))
        if body is None:
            return await refuse(send, 413, "batch_too_large",
                                "batch larger than 256 largest entries")
        try:
            entries = tiles.decode_bundle(body)
        except tiles.TileError as e:
            return await refuse(send, 400, "bad_batch", f"bad batch: {e}")
        if not entries or any(not e or len(e) > self.max_entry for e in entries):
            return await refuse(send, 400, "bad_batch", "empty batch, empty entry or entry "
                                f"larger than {self.max_entry} bytes")
        if self.log.role != SEQUENCER:
            return await _not_sequencer(send, self.log.sequencer_url)
        results = await self.log.add_many(entries)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, AppendError):
                raise r
        if batch.wanted(headers.get(b"accept", b"")):
            return await respond(send, 200, self._compact(results),
                                 batch.MEDIA_TYPE.encode(), b"no-store")
        out: list[dict[str, object]] = [
            {"error": str(r), "code": r.code} if isinstance(r, AppendError)
            else {"index": r.index, "checkpoint": r.checkpoint.decode(),
                  "proof": r.proof.decode()}
            for r in results]
        await _json(send, 200, {"entries": out})

    def _compact(self, results: list[Added | AppendError]) -> bytes:
        """The compact answer: one checkpoint, the newest (then most cosigned) of those the
        entries were answered under, and one proof of every acknowledged entry under it
        (the same tree size has the same proofs)."""
        added = [r for r in results if isinstance(r, Added)]
        head = max((a.head for a in added), key=lambda h: (h.size, len(h.note)),
                   default=self.log.served)
        items: list[int | batch.Refused] = [
            batch.Refused(str(r), r.code) if isinstance(r, AppendError) else r.index
            for r in results]
        return batch.encode(head.note, items,
                            self.log.batch_inclusion([a.index for a in added], head))

    async def _tile(self, p: str, send: Send) -> None:
        try:
            t = tiles.parse_path(p)
        except tiles.TileError as e:
            return await refuse(send, 400, "bad_tile_path", str(e))
        if t.level is None:
            data = self.log.bundle(t.index, t.width)
        else:
            data = self.log.tile(t.level, t.index, t.width)
        if data is None:
            return await refuse(send, 404, "tile_not_found", "tile beyond the tree")
        cache = IMMUTABLE if not t.partial else b"public, max-age=3600"
        await respond(send, 200, data, OCTETS, cache)

    async def _proof(self, request_hash: str, send: Send) -> None:
        if not HEX64.fullmatch(request_hash):
            return await refuse(send, 400, "invalid_request_hash",
                                "request hash must be 64 lower-case hex digits")
        text = self.log.proof_for(request_hash)
        if text is None:
            return await refuse(send, 404, "proof_not_found",
                                "no logged receipt with that request hash")
        await respond(send, 200, text, TEXT, b"no-cache")

    async def _consistency(self, scope: Scope, send: Send) -> None:
        q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        old, new = _size(q.get("old")), _size(q.get("new"))
        if old is None or new is None:
            return await refuse(send, 400, "bad_consistency_request",
                                "old and new must each be given once, as decimal tree sizes")
        try:
            hashes = self.log.consistency(old, new)
        except merkle.ProofError as e:
            return await refuse(send, 400, "bad_consistency_request",
                                f"bad consistency request: {e}")
        await _json(send, 200, {"proof": [base64.b64encode(h).decode() for h in hashes]})


def _size(values: list[str] | None) -> int | None:
    """A tree size given exactly once as canonical decimal (ASCII digits, no leading zero,
    at most the largest tree size), else None."""
    if values is None or len(values) != 1:
        return None
    v = values[0]
    if not (v.isascii() and v.isdigit()) or len(v) > 19 or (len(v) > 1 and v[0] == "0"):
        return None
    n = int(v)
    return n if n <= tiles.MAX_TREE_SIZE else None


async def _not_sequencer(send: Send, sequencer: str | None) -> None:
    """503 for an append sent to a replica that does not sequence; names the one that does."""
    body = {"error": "this log replica is not the sequencer; append at the sequencer",
            "code": "not_sequencer", "sequencer": sequencer}
    await respond(send, 503, json.dumps(body).encode(), JSON, b"no-store",
                  [(b"retry-after", b"1")])


async def _unavailable(send: Send, code: str, reason: str) -> None:
    """503 for what the log cannot do now; the client tries again after a second."""
    await refuse(send, 503, code, reason, [(b"retry-after", b"1")])


async def _json(send: Send, status: int, obj: object) -> None:
    await respond(send, status, orjson.dumps(obj), JSON, b"no-store")
