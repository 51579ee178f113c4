"""The C2SP tlog-witness add-checkpoint request body.

    old <decimal size>
    <base64 consistency proof hash>     (at most 63 lines)
    <empty line>
    <signed checkpoint note>

The response to a successful request is the witness's cosignature line(s).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from tlog.merkle import HASH_SIZE

MAX_PROOF_LINES = 63
MAX_BODY = 1 << 16
SIZE_CONTENT_TYPE = "text/x.tlog.size"


class RequestError(ValueError):
    """A malformed add-checkpoint body (answered with 400)."""


@dataclass(frozen=True)
class AddCheckpoint:
    """The parts of an add-checkpoint request; `checkpoint` is the note bytes."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: bytes


def format(old_size: int, proof: Sequence[bytes], checkpoint: bytes) -> bytes:  # noqa: A001
    """Body for POST /add-checkpoint."""
    lines = [b"old %d" % old_size] + [base64.b64encode(h) for h in proof]
    return b"\n".join(lines) + b"\n\n" + checkpoint


def parse(body: bytes) -> AddCheckpoint:
    """Parse an add-checkpoint body; the note is returned unverified."""
    if len(body) > MAX_BODY:
        raise RequestError("body too large")
    head, sep, note_bytes = body.partition(b"\n\n")
    if not sep or not note_bytes:
        raise RequestError("missing checkpoint")
    lines = head.split(b"\n")
    old = lines[0]
    if not old.startswith(b"old "):
        raise RequestError("first line must be 'old <size>'")
    num = old[4:]
    if not num.isdigit() or (num != b"0" and num.startswith(b"0")):
        raise RequestError("malformed old size")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise RequestError("more than 63 consistency proof lines")
    try:
        proof = tuple(base64.b64decode(h, validate=True) for h in lines[1:])
    except binascii.Error as e:
        raise RequestError("malformed proof line") from e
    if any(len(h) != HASH_SIZE for h in proof):
        raise RequestError("proof hash is not 32 bytes")
    return AddCheckpoint(int(num), proof, note_bytes)
