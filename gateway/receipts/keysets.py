"""The gateway's keyset entry (`pag-keyset/1`, verifier/keyset_entry.py): logged before the
first receipt signed with the keyset, and named by every receipt (`keyset_index`).

The story of a start-up (`ensure_logged`, run before the gateway opens its listener):

1. Reuse. `keyset-entry.json` in the data directory records an earlier append: the keyset
   hash, the log's vkey, the index and the proof the log returned (verified when it came).
   If it names this keyset and this log, and its proof still verifies under that vkey,
   the keyset is logged already and its index is reused: a restart appends nothing.
2. Otherwise, append. Read the log's checkpoint (signed by the log); ask the TEE for an
   attestation of the keyset with nonce `nonce_for(checkpoint)`, so the quote provably
   postdates that checkpoint; build the entry and append it (`LogClient.append`: the
   proof must show exactly this entry under a checkpoint signed by the log and cosigned
   by the witness quorum). Only then is the record written (temporary file, fsync,
   rename), and the index returned. When the TEE reports its app-compose document
   (whose SHA-256 is the attested compose hash), the entry carries it and the image
   digests it pins, for release transparency.
3. Wait. Until step 2 succeeds the gateway does not listen: no receipt can be signed
   with an unlogged keyset, and `/healthz` does not answer, so a supervisor sees it is
   not ready. Failures are retried forever with capped backoff, each logged on one line.
   (A proof below the witness quorum is retried by appending again: the keyset entry is
   then in the log more than once, which is harmless; receipts name the index that was
   proven.)

The keyset is fixed for the life of the process (its keys derive from dstack KMS paths
and the configured log vkey); a keyset change is a restart, which runs this again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.receipts.logclient import LogClient, LogError
from tlog import checkpoint, merkle, note, proof
from verifier import keyset_entry

log = logging.getLogger("gateway.receipts.keysets")

RECORD_FILE = "keyset-entry.json"
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
Attest = Callable[[str | None], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class LoggedKeyset:
    """Where the keyset entry is in the log, and the proof the log gave for it."""

    keyset_hash: str
    log_vkey: str
    index: int
    proof: str

    def to_json(self) -> dict[str, Any]:
        return {"keyset_hash": self.keyset_hash, "log_vkey": self.log_vkey,
                "index": self.index, "proof": self.proof}


def load_record(data_dir: Path, keyset_hash: str, log_vkey: str) -> LoggedKeyset | None:
    """The recorded append of this keyset to this log, if its proof still verifies."""
    try:
        doc = json.loads((data_dir / RECORD_FILE).read_text())
        rec = LoggedKeyset(str(doc["keyset_hash"]), str(doc["log_vkey"]), doc["index"],
                           str(doc["proof"]))
        if rec.keyset_hash != keyset_hash or rec.log_vkey != log_vkey \
                or not isinstance(rec.index, int) or isinstance(rec.index, bool):
            return None
        p = proof.parse(rec.proof.encode())
        cp, _ = checkpoint.open(p.checkpoint, note.verifier_from_vkey(log_vkey))
        if p.extra is None or p.index != rec.index:
            return None
        proof.check_inclusion(p, cp, p.extra)
        if json.loads(p.extra).get("keyset_hash") != keyset_hash:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, merkle.ProofError):
        return None
    return rec


def save_record(data_dir: Path, rec: LoggedKeyset) -> None:
    """Write the record atomically and durably."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / RECORD_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(rec.to_json()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def append_keyset(client: LogClient, attest: Attest, keyset_hash: str,
                        now: Callable[[], str], app_compose: str | None = None
                        ) -> proof.TlogProof:
    """Step 2: append the keyset entry (with the app-compose document and its image
    digests when given); the verified proof of the append."""
    cp = await client.checkpoint()
    doc = await attest(keyset_entry.nonce_for(cp))
    if doc.get("keyset_hash") != keyset_hash:
        raise LogError("keyset_mismatch", "the attested keyset is not the gateway's own")
    return await client.append(keyset_entry.entry(
        keyset_entry.build(doc, cp, now(), app_compose)))


async def ensure_logged(client: LogClient, attest: Attest, keyset_hash: str, log_vkey: str,
                        data_dir: Path, now: Callable[[], str],
                        app_compose: str | None = None) -> LoggedKeyset:
    """The logged keyset entry of this keyset: reused, or appended (retrying forever)."""
    rec = load_record(data_dir, keyset_hash, log_vkey)
    if rec is not None:
        log.info("keyset %s is logged at index %d (recorded)", keyset_hash[:16], rec.index)
        return rec
    delay = BACKOFF_START
    while True:
        try:
            p = await append_keyset(client, attest, keyset_hash, now, app_compose)
        except LogError as e:
            if e.code in ("entry_too_large", "keyset_mismatch"):
                raise
            log.warning("keyset entry not logged yet (%s); retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        rec = LoggedKeyset(keyset_hash, log_vkey, p.index, p.format().decode())
        save_record(data_dir, rec)
        log.info("keyset %s logged at index %d", keyset_hash[:16], p.index)
        return rec
