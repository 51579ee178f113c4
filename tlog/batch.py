"""The compact answer of `POST /add-batch`, asked for with `Accept: application/vnd.pag.batch+json`.

    {"checkpoint": "<signed checkpoint note, with its cosignatures>",
     "entries": [{"index": I, "proof": ["<base64 hash>", ...]}      (leaf side first)
                 or {"error": "<reason>", "code": "<stable code>"}, ...]}

One checkpoint for the whole batch: every entry's inclusion proof is against
it, so a client verifies its signature and witness quorum once, not once per
entry. The entries are answered in the order they were sent. What `POST /add`
would have answered for entry i is rebuilt by the client from the entry it
sent: `included.tlog_proof(checkpoint, entry).format()` is the same
c2sp.org/tlog-proof@v1 text, byte for byte. The default answer (no such
Accept) stays one full `POST /add` answer per entry.

Pure: bytes and parsed JSON in, values out; `BatchFormatError` for anything
malformed. Nothing here verifies a signature or a proof.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from tlog import merkle, proof

MEDIA_TYPE = "application/vnd.pag.batch+json"
B64_HASH = 44
"""Characters of a 32-byte hash in padded base64."""


class BatchFormatError(ValueError):
    """A malformed compact batch answer."""


@dataclass(frozen=True)
class Included:
    """An acknowledged entry: its index and inclusion proof under the batch's checkpoint."""

    index: int
    hashes: tuple[bytes, ...]

    def tlog_proof(self, checkpoint: bytes, entry: bytes) -> proof.TlogProof:
        """The tlog-proof `POST /add` answers for `entry` under `checkpoint`."""
        return proof.TlogProof(self.index, self.hashes, checkpoint, entry)


@dataclass(frozen=True)
class Refused:
    """An entry the log did not acknowledge (sending it again is safe)."""

    error: str
    code: str


@dataclass(frozen=True)
class BatchAnswer:
    """A parsed compact answer; `checkpoint` is the note's bytes, unverified."""

    checkpoint: bytes
    entries: tuple[Included | Refused, ...]


def wanted(accept: bytes) -> bool:
    """Whether an Accept header value names the compact answer's media type."""
    return any(part.split(b";", 1)[0].strip().lower() == MEDIA_TYPE.encode()
               for part in accept.split(b","))


def encode(checkpoint: bytes, entries: Sequence[Included | Refused]) -> bytes:
    """The compact answer's JSON bytes. Neighbouring entries' paths share most hashes,
    so each distinct hash is base64-encoded once."""
    b64: dict[bytes, str] = {}
    items: list[dict[str, object]] = []
    for e in entries:
        if isinstance(e, Refused):
            items.append({"error": e.error, "code": e.code})
            continue
        path = []
        for h in e.hashes:
            text = b64.get(h)
            if text is None:
                text = b64[h] = binascii.b2a_base64(h, newline=False).decode()
            path.append(text)
        items.append({"index": e.index, "proof": path})
    return orjson.dumps({"checkpoint": checkpoint.decode(), "entries": items})


def parse(doc: object) -> BatchAnswer:
    """A compact answer from its parsed JSON, or BatchFormatError."""
    if not isinstance(doc, dict):
        raise BatchFormatError("answer is not an object")
    note, items = doc.get("checkpoint"), doc.get("entries")
    if not isinstance(note, str) or not note:
        raise BatchFormatError("no checkpoint")
    if not isinstance(items, list):
        raise BatchFormatError("no entries list")
    return BatchAnswer(note.encode(), tuple(_item(it) for it in items))


def _item(item: object) -> Included | Refused:
    if not isinstance(item, dict):
        raise BatchFormatError("an entry's answer is not an object")
    if "error" in item:
        error, code = item["error"], item.get("code")
        if not isinstance(error, str) or not isinstance(code, str):
            raise BatchFormatError("a refusal without a string error and code")
        return Refused(error, code)
    index, hashes = item.get("index"), item.get("proof")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise BatchFormatError("an index that is not a non-negative integer")
    if (not isinstance(hashes, list) or len(hashes) > proof.MAX_PROOF_HASHES
            or not all(isinstance(h, str) and len(h) == B64_HASH for h in hashes)):
        raise BatchFormatError("a proof that is not a list of at most 64 base64 hashes")
    try:
        decoded = tuple(binascii.a2b_base64(h, strict_mode=True) for h in hashes)
    except ValueError as e:  # binascii.Error, or a str that is not ASCII
        raise BatchFormatError("malformed base64 in a proof") from e
    if any(len(h) != merkle.HASH_SIZE for h in decoded):
        raise BatchFormatError("a proof hash that is not 32 bytes")
    return Included(index, decoded)
