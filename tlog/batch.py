"""The compact answer of `POST /add-batch`, asked for with
`Accept: application/vnd.pag.batch-proof+json`.

    {"checkpoint": "<signed checkpoint note, with its cosignatures>",
     "entries": [{"index": I} or {"error": "<reason>", "code": "<stable code>"}, ...],
     "proof": ["<base64 hash>", ...]}

One checkpoint and one proof for the whole batch. `proof` is the batch
inclusion proof of every acknowledged entry's index under that checkpoint
(`merkle.prove_batch`: the hashes of the subtrees beside them, in the order of
a left-first walk), so a run of k neighbouring entries costs about
2 log2(size) hashes, not k times log2(size). The entries are answered in the
order they were sent; the same entry sent twice has the same index.

A client recomputes the root from the leaf hashes of the entries it sent
(`rebuild`), compares it with the checkpoint's (after verifying the
checkpoint's signatures once), and gets on the way each entry's own
inclusion path: `rebuild`'s tlog-proof for entry i is the c2sp.org/tlog-proof@v1
text `POST /add` answers for it, byte for byte. The default answer (no such
Accept) stays one full `POST /add` answer per entry.

Pure: bytes and parsed JSON in, values out; `BatchFormatError` for anything
malformed. Nothing here verifies a signature; `rebuild` computes a root, the
caller compares it.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from tlog import merkle, proof, tiles

MEDIA_TYPE = "application/vnd.pag.batch-proof+json"
B64_HASH = 44
"""Characters of a 32-byte hash in padded base64."""
MAX_PROOF_HASHES = tiles.WIDTH * proof.MAX_PROOF_HASHES
"""A batch holds at most tiles.WIDTH entries, each needing at most 64 hashes."""


class BatchFormatError(ValueError):
    """A malformed compact batch answer."""


@dataclass(frozen=True)
class Refused:
    """An entry the log did not acknowledge (sending it again is safe)."""

    error: str
    code: str


@dataclass(frozen=True)
class BatchAnswer:
    """A parsed compact answer; `checkpoint` is the note's bytes, unverified. Each entry
    is its index or why it was refused; `proof` proves the indices' inclusion."""

    checkpoint: bytes
    entries: tuple[int | Refused, ...]
    proof: tuple[bytes, ...]


def wanted(accept: bytes) -> bool:
    """Whether an Accept header value names the compact answer's media type."""
    return any(part.split(b";", 1)[0].strip().lower() == MEDIA_TYPE.encode()
               for part in accept.split(b","))


def encode(checkpoint: bytes, entries: Sequence[int | Refused], hashes: Sequence[bytes]
           ) -> bytes:
    """The compact answer's JSON bytes: `hashes` is `merkle.prove_batch` of the indices."""
    items = [{"error": e.error, "code": e.code} if isinstance(e, Refused) else {"index": e}
             for e in entries]
    return orjson.dumps({"checkpoint": checkpoint.decode(), "entries": items,
                         "proof": [binascii.b2a_base64(h, newline=False).decode()
                                   for h in hashes]})


def parse(doc: object) -> BatchAnswer:
    """A compact answer from its parsed JSON, or BatchFormatError."""
    if not isinstance(doc, dict):
        raise BatchFormatError("answer is not an object")
    note, items, hashes = doc.get("checkpoint"), doc.get("entries"), doc.get("proof")
    if not isinstance(note, str) or not note:
        raise BatchFormatError("no checkpoint")
    if not isinstance(items, list):
        raise BatchFormatError("no entries list")
    if (not isinstance(hashes, list) or len(hashes) > MAX_PROOF_HASHES
            or not all(isinstance(h, str) and len(h) == B64_HASH for h in hashes)):
        raise BatchFormatError(f"a proof that is not a list of at most {MAX_PROOF_HASHES} "
                               "base64 hashes")
    try:
        decoded = tuple(binascii.a2b_base64(h, strict_mode=True) for h in hashes)
    except ValueError as e:  # binascii.Error, or a str that is not ASCII
        raise BatchFormatError("malformed base64 in the proof") from e
    if any(len(h) != merkle.HASH_SIZE for h in decoded):
        raise BatchFormatError("a proof hash that is not 32 bytes")
    return BatchAnswer(note.encode(), tuple(_item(it) for it in items), decoded)


def _item(item: object) -> int | Refused:
    if not isinstance(item, dict):
        raise BatchFormatError("an entry's answer is not an object")
    if "error" in item:
        error, code = item["error"], item.get("code")
        if not isinstance(error, str) or not isinstance(code, str):
            raise BatchFormatError("a refusal without a string error and code")
        return Refused(error, code)
    index = item.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise BatchFormatError("an index that is not a non-negative integer")
    return index


def rebuild(answer: BatchAnswer, entries: Sequence[bytes], size: int
            ) -> tuple[bytes | None, list[proof.TlogProof | Refused]]:
    """The root `answer.proof` implies for `entries` (the ones sent, in order) in a tree of
    `size` leaves (the checkpoint's), and each entry's tlog-proof under the checkpoint or
    its refusal. The root is None when every entry was refused (then the proof must be
    empty).

    BatchFormatError if the answer has another number of entries, or gives two
    different entries one index; merkle.ProofError if the proof does not fit the
    indices. The caller compares the root with the checkpoint's.
    """
    if len(answer.entries) != len(entries):
        raise BatchFormatError("wrong number of entries")
    leaves: dict[int, bytes] = {}
    for entry, item in zip(entries, answer.entries, strict=True):
        if isinstance(item, int):
            h = merkle.leaf_hash(entry)
            if leaves.setdefault(item, h) != h:
                raise BatchFormatError(f"two different entries answered with index {item}")
    if not leaves:
        if answer.proof:
            raise merkle.ProofError("a proof for no acknowledged entry")
        return None, list(answer.entries)  # type: ignore[arg-type]  # all Refused
    root, paths = merkle.root_from_batch(leaves, size, answer.proof)
    return root, [item if isinstance(item, Refused)
                  else proof.TlogProof(item, tuple(paths[item]), answer.checkpoint, entry)
                  for entry, item in zip(entries, answer.entries, strict=True)]
