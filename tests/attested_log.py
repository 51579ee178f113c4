"""A static tlog-tiles log whose entry 1 is a real `pag-keyset/1` entry (dstack simulator
attestation bound to the log's checkpoint), and receipts signed by that keyset's key.

Shared by the verifier CLI and monitor tests: `attested_log()` runs the simulator once;
`write_log` lays entries out as the log serves them (tiles, bundles, checkpoint).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from tests.test_attestation import _with_sim
from tlog import checkpoint, merkle, note, proof, tiles
from verifier import keyset_entry, receipt

SALT = bytes(range(32))
KEYSET_INDEX = 1


@dataclass
class AttestedLog:
    """The log key, the first entries (genesis, keyset entry), the keyset's receipt key."""

    signer: note.Ed25519Signer
    entries: list[bytes]
    receipt_key: Ed25519PrivateKey
    gateway: dict[str, str]
    keyset_obj: dict[str, Any]


def attested_log(origin: str = "example.com/attested") -> AttestedLog:
    """Entry 0 a plain entry, entry 1 a keyset entry bound to the size-1 checkpoint."""
    signer = note.generate_signer(origin)
    entries = [b"genesis"]
    cp = checkpoint.sign(checkpoint.Checkpoint(signer.name, 1, merkle.root(
        [merkle.leaf_hash(e) for e in entries])), signer)
    short = Path(tempfile.mkdtemp(prefix="pagv-", dir="/tmp"))

    async def fn(client: Any, srv: Any) -> tuple[Any, dict[str, Any]]:
        gk = await keys.load(client, log_vkey=signer.vkey)
        return gk, await identity_attestation.build(client, gk, keyset_entry.nonce_for(cp))

    try:
        gk, doc = _with_sim(short, fn)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    obj = keyset_entry.build(doc, cp, "2026-12-05T00:00:00Z")
    entries.append(keyset_entry.entry(obj))
    gateway = {"app_id": doc["app_id"], "compose_hash": doc["compose_hash"],
               "keyset_hash": doc["keyset_hash"]}
    return AttestedLog(signer, entries, gk.receipt_key, gateway, obj)


def make_receipt(key: Ed25519PrivateKey, gateway: dict[str, str], *, route: str = "demo",
                 provider: str = "demo", verified: bool = True, request: bytes = b"r",
                 response: bytes = b"s", keyset_index: int = KEYSET_INDEX,
                 forwarded: bool = True, **extra: Any) -> dict[str, Any]:
    """A signed pag-receipt/2 with digests under SALT."""
    def d(data: bytes) -> str:
        return receipt.digest(SALT, data)

    body = {"v": receipt.VERSION, "id": "r-" + d(request)[:8], "time": "2026-12-05T00:00:01Z",
            "gateway": dict(gateway), "request_hash": d(request),
            "forwarded_hash": d(request) if forwarded else None,
            "route": {"route_id": route, "model": "m", "provider": provider,
                      "upstream_model": "u"} if forwarded else {},
            "upstream": {"verified": verified, "evidence": "dstack", "binding": "x",
                         "lease_id": "l", "verified_at": "t", "expires_at": "t"},
            "provider_request_hash": d(b"p") if forwarded else None,
            "provider_response_hash": d(b"q") if forwarded else None,
            "response_hash": d(response), "e2ee": {"mode": "none"},
            "keyset_index": keyset_index, **extra}
    return receipt.sign(body, key)


def write_log(d: Path, signer: note.Ed25519Signer, entries: list[bytes]) -> bytes:
    """Lay out `entries` as a tlog-tiles log in `d`; the signed checkpoint."""
    hashes = [merkle.leaf_hash(e) for e in entries]
    for (lv, ix), data in tiles.extend(0, hashes, lambda a, b: b"").items():
        p = d / tiles.path(lv, ix, len(data) // 32)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for b in tiles.bundles_for_size(len(entries)):
        p = d / str(b)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(tiles.encode_bundle(entries[b.index * 256: b.index * 256 + b.width]))
    cp = checkpoint.sign(checkpoint.Checkpoint(signer.name, len(entries), merkle.root(hashes)),
                         signer)
    (d / "checkpoint").write_bytes(cp)
    return cp


def proof_text(entries: list[bytes], index: int, cp: bytes, extra: bytes | None = None) -> bytes:
    """The tlog-proof of entry `index` (its `extra` the entry, or `extra` if given)."""
    hashes = [merkle.leaf_hash(e) for e in entries]
    p = proof.TlogProof(index, tuple(merkle.inclusion_proof(index, len(hashes), hashes)), cp,
                        entries[index] if extra is None else extra)
    return p.format()
