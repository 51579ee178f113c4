"""C2SP tlog-proof@v1: an offline-verifiable proof that an entry is in a log.

    c2sp.org/tlog-proof@v1
    extra <base64 opaque data>          (optional)
    index <decimal leaf index>
    <base64 inclusion proof hash>       (zero or more, leaf side first)
    <empty line>
    <signed checkpoint note, with any cosignatures>

In this project `extra` carries the logged entry itself (a signed receipt).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from tlog import checkpoint, merkle

HEADER = b"c2sp.org/tlog-proof@v1"
MAX_PROOF_HASHES = 64


class ProofFormatError(ValueError):
    """A malformed tlog-proof."""


@dataclass(frozen=True)
class TlogProof:
    """The parts of a tlog-proof; `checkpoint` is the signed note bytes."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None

    def format(self, memo: dict[bytes, bytes] | None = None) -> bytes:
        """The proof's text. Proofs formatted together may share a `memo` of the base64
        of their hashes (neighbouring entries' paths share most of them)."""
        lines = [HEADER]
        if self.extra is not None:
            lines.append(b"extra " + binascii.b2a_base64(self.extra, newline=False))
        lines.append(b"index %d" % self.index)
        if memo is None:
            lines += [binascii.b2a_base64(h, newline=False) for h in self.hashes]
        else:
            for h in self.hashes:
                text = memo.get(h)
                if text is None:
                    text = memo[h] = binascii.b2a_base64(h, newline=False)
                lines.append(text)
        return b"\n".join(lines) + b"\n\n" + self.checkpoint


def parse(data: bytes) -> TlogProof:
    """Parse a tlog-proof; the checkpoint note is returned unverified."""
    head, sep, note_bytes = data.partition(b"\n\n")
    if not sep or not note_bytes:
        raise ProofFormatError("tlog-proof has no checkpoint")
    lines = head.split(b"\n")
    if lines[0] != HEADER:
        raise ProofFormatError("not a c2sp.org/tlog-proof@v1 proof")
    i = 1
    extra = None
    try:
        if i < len(lines) and lines[i].startswith(b"extra "):
            extra = base64.b64decode(lines[i][6:], validate=True)
            i += 1
        if i >= len(lines) or not lines[i].startswith(b"index "):
            raise ProofFormatError("tlog-proof has no index line")
        idx = lines[i][6:]
        if not idx.isdigit() or (idx != b"0" and idx.startswith(b"0")):
            raise ProofFormatError("malformed index")
        hashes = tuple(base64.b64decode(h, validate=True) for h in lines[i + 1 :])
    except binascii.Error as e:
        raise ProofFormatError("malformed base64 in tlog-proof") from e
    if len(hashes) > MAX_PROOF_HASHES or any(len(h) != merkle.HASH_SIZE for h in hashes):
        raise ProofFormatError("malformed inclusion proof hashes")
    return TlogProof(int(idx), hashes, note_bytes, extra)


def check_inclusion(proof: TlogProof, cp: checkpoint.Checkpoint, entry: bytes | None = None) -> None:
    """Raise merkle.ProofError unless the entry is at `proof.index` under `cp`.

    The entry defaults to `proof.extra`; `cp` must be the verified checkpoint
    parsed from `proof.checkpoint`.
    """
    data = entry if entry is not None else proof.extra
    if data is None:
        raise merkle.ProofError("no entry to check: the proof carries no extra data")
    merkle.verify_inclusion(
        merkle.leaf_hash(data), proof.index, cp.size, list(proof.hashes), cp.root_hash
    )
