"""Receipt lookups from any replica: every receipt, with the hash of the API key that made
the call, is also kept in the shared Redis for `[shared] receipt_ttl_seconds`.

A replica answers `GET /v1/receipts/{id}` from its own outbox first; a receipt another
replica signed is found here (`receipt:<id>`; and `receipt-rh:<request hash>` names the id
for the lookup by request hash). The proof is not stored here: the answering replica asks
the log for it (`GET /proof/{request_hash}`) and checks it as the shipper does.

Invariants:
- The owner rule is the outbox's: by id, only the key whose SHA-256 is recorded gets the
  receipt; any other key gets the same 404 as an unknown id.
- Redis is not trusted with the owner: each record carries an HMAC-SHA256 over the id,
  the owner, the request hash and the entry, under a key every replica derives from the
  same dstack KMS path; a record whose MAC, id or request hash does not match is ignored
  (so whoever can write to Redis cannot hand a receipt to another key). The entry itself is
  the signed receipt, public once logged: nothing secret (no salt, no content) is stored.
- Storing is best effort after the outbox commit (which is what makes a receipt durable):
  if Redis cannot take it, the signing replica still answers for it and the failure is
  logged; a lookup that cannot reach Redis is a 404 from the other replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.api import shared
from gateway.receipts.shipper import ProofChecker, ShipError
from tlog import proof

log = logging.getLogger("gateway.receipts.index")


@dataclass(frozen=True)
class Indexed:
    """A receipt found in the shared index."""

    id: str
    request_hash: str
    entry: bytes
    key_sha256: str


def _mac(key: bytes, receipt_id: str, owner: str, request_hash: str, entry: bytes) -> str:
    msg = b"pag-receipt-index/1\n" + f"{receipt_id}\n{owner}\n{request_hash}\n".encode() + entry
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def seal(key: bytes, receipt_id: str, owner: str, request_hash: str, entry: bytes) -> bytes:
    """The stored value: `<mac hex> <owner> <request hash>\\n<entry>`."""
    return f"{_mac(key, receipt_id, owner, request_hash, entry)} {owner} {request_hash}\n" \
        .encode() + entry


def unseal(key: bytes, receipt_id: str, value: bytes) -> Indexed | None:
    """The record stored for `receipt_id`, or None if it is not one this app sealed for it."""
    head, sep, entry = value.partition(b"\n")
    parts = head.decode("ascii", "replace").split(" ")
    if not sep or len(parts) != 3:
        return None
    mac, owner, request_hash = parts
    if not hmac.compare_digest(mac, _mac(key, receipt_id, owner, request_hash, entry)):
        return None
    return Indexed(receipt_id, request_hash, entry, owner)


class RedisReceiptIndex:
    """Receipts by id (and request hash) in the shared Redis, MACed (see module docstring)."""

    def __init__(self, client: Any, prefix: str, mac_key: bytes, ttl_seconds: int) -> None:
        if len(mac_key) < 32:
            raise ValueError("the receipt index MAC key must be at least 32 bytes")
        self._redis = client
        self._prefix = prefix
        self._key = mac_key
        self.ttl = ttl_seconds
        self._errors = shared.errors()
        self.failures = 0

    async def put(self, receipt_id: str, request_hash: str, entry: bytes, owner: str) -> None:
        """Record a committed receipt (best effort: a failure is logged, not raised)."""
        try:
            async with self._redis.pipeline(transaction=False) as p:  # one round trip
                for k, v in self.records(receipt_id, request_hash, entry, owner):
                    p.set(k, v, ex=self.ttl)
                failed = sum(isinstance(r, BaseException)
                             for r in await p.execute(raise_on_error=False))
        except self._errors:
            failed = 2
        self.stored(failed)

    def records(self, receipt_id: str, request_hash: str, entry: bytes,
                owner: str) -> list[tuple[str, bytes]]:
        """The (key, value) pairs `put` writes, each to expire after `ttl` seconds (for a
        caller that writes them in its own round trip, then calls `stored`). The
        request-hash key only names an id, whose record `get` checks anyway."""
        return [(f"{self._prefix}receipt:{receipt_id}",
                 seal(self._key, receipt_id, owner, request_hash, entry)),
                (f"{self._prefix}receipt-rh:{request_hash}", receipt_id.encode())]

    def stored(self, failed: int) -> None:
        """Note how many of the record's writes failed: counted and logged, never raised."""
        if not failed:
            return
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            log.warning("receipt not shared with the other replicas (%d of its writes "
                        "failed); only this replica can answer for it", failed)

    async def get(self, receipt_id: str) -> Indexed | None:
        """The receipt with this id, or None (unknown, expired, not ours, Redis down)."""
        try:
            value = await self._redis.get(f"{self._prefix}receipt:{receipt_id}")
        except self._errors:
            return None
        return unseal(self._key, receipt_id, value) if value else None

    async def by_request_hash(self, request_hash: str) -> Indexed | None:
        """The receipt whose `request_hash` this is, or None."""
        try:
            rid = await self._redis.get(f"{self._prefix}receipt-rh:{request_hash}")
        except self._errors:
            return None
        found = await self.get(rid.decode("ascii", "replace")) if rid else None
        return found if found is not None and found.request_hash == request_hash else None


async def logged_proof(http: Any, log_url: str, checker: ProofChecker, entry: bytes,
                       request_hash: str) -> tuple[int, str] | None:
    """(index, tlog-proof text) the log serves for `entry`, checked as the shipper checks its
    proofs (entry, log signature, witness quorum, inclusion); None if the log has none yet,
    cannot be reached, or answers with anything that does not verify."""
    try:
        r = await http.get(f"{log_url}/proof/{request_hash}", timeout=2.0)
        if r.status_code != 200:
            return None
        p = checker.check_proof(entry, proof.parse(r.content))
    except (httpx.HTTPError, proof.ProofFormatError, ShipError):
        return None
    if p.extra != entry:  # the log names the entry it proves; it must be this one
        return None
    return p.index, r.content.decode("utf-8", "replace")
