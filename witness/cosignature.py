"""C2SP tlog-cosignature v1 and the K-of-N witness policy.

A cosignature is an Ed25519 signature over

    cosignature/v1
    time <decimal seconds since the epoch>
    <checkpoint note text>

carried as a note signature line whose bytes are key ID (4) || timestamp
(8, big-endian) || signature (64). Cosigner keys have alg 0x04: key ID =
SHA-256(name || 0x0A || 0x04 || key)[:4], vkey `name+hexid+base64(0x04||key)`.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from tlog import checkpoint, note

ALG_COSIGNATURE = 0x04


class QuorumError(ValueError):
    """Fewer valid witness cosignatures than the policy requires."""


def message(text: bytes, timestamp: int) -> bytes:
    """The bytes a witness signs for checkpoint note text at `timestamp`."""
    return b"cosignature/v1\ntime %d\n" % timestamp + text


@dataclass(frozen=True)
class CosignatureVerifier:
    """Verifies alg 0x04 cosignatures; usable as a note.Verifier."""

    name: str
    key_id: bytes
    public_key: bytes

    def verify(self, text: bytes, sig: bytes) -> bool:
        if len(sig) != 72:
            return False
        ts = int.from_bytes(sig[:8], "big")
        if ts == 0:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(sig[8:], message(text, ts))
        except InvalidSignature:
            return False
        return True

    @property
    def vkey(self) -> str:
        return note.format_vkey(self.name, ALG_COSIGNATURE, self.public_key)


class CosignatureSigner:
    """Makes timestamped cosignatures; usable as a note.Signer."""

    def __init__(self, name: str, seed: bytes, clock: Callable[[], float] = time.time) -> None:
        if not note.valid_name(name):
            raise note.NoteError(f"invalid key name {name!r}")
        self.name = name
        self._seed = seed
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes_raw()
        self.key_id = note.key_id(name, ALG_COSIGNATURE, self.public_key)
        self._clock = clock

    def sign(self, text: bytes) -> bytes:
        """timestamp (8 bytes) || Ed25519 signature over message(text, timestamp)."""
        ts = max(1, int(self._clock()))
        return ts.to_bytes(8, "big") + self._key.sign(message(text, ts))

    @property
    def vkey(self) -> str:
        return note.format_vkey(self.name, ALG_COSIGNATURE, self.public_key)

    @property
    def skey(self) -> str:
        b64 = base64.b64encode(bytes([ALG_COSIGNATURE]) + self._seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{b64}"

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.key_id, self.public_key)


def generate_signer(name: str) -> CosignatureSigner:
    """A new random cosigner."""
    return CosignatureSigner(name, os.urandom(32))


def parse_skey(skey: str) -> CosignatureSigner:
    """Load a cosigner from `PRIVATE+KEY+name+hexid+base64(0x04||seed)`."""
    parts = skey.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise note.NoteError("malformed skey")
    try:
        raw = base64.b64decode(parts[4], validate=True)
    except ValueError as e:  # binascii.Error, or a str with non-ASCII characters
        raise note.NoteError("malformed skey") from e
    if len(raw) != 33 or raw[0] != ALG_COSIGNATURE:
        raise note.NoteError("skey is not a cosignature key")
    signer = CosignatureSigner(parts[2], raw[1:])
    if signer.key_id.hex() != parts[3]:
        raise note.NoteError("skey key ID does not match its key")
    return signer


def verifier_from_vkey(vkey: str) -> CosignatureVerifier:
    """A cosignature verifier from an alg 0x04 vkey."""
    name, kid, alg, pub = note.parse_vkey(vkey)
    if alg != ALG_COSIGNATURE or len(pub) != 32:
        raise note.NoteError("vkey is not an Ed25519 cosignature (0x04) key")
    return CosignatureVerifier(name, kid, pub)


def cosign(note_bytes: bytes, signer: CosignatureSigner) -> note.Signature:
    """A cosignature on a (signed) checkpoint note."""
    text, _ = note.split(note_bytes)
    return note.Signature(signer.name, signer.key_id, signer.sign(text))


def timestamp(sig: note.Signature) -> int:
    """The time a cosignature claims."""
    return int.from_bytes(sig.sig[:8], "big")


@dataclass(frozen=True)
class Witnessed:
    """A checkpoint verified under a witness policy."""

    checkpoint: checkpoint.Checkpoint
    note: note.Note
    cosigners: tuple[str, ...]


def verify_witnessed(
    note_bytes: bytes,
    log_verifier: note.Verifier,
    witnesses: Sequence[CosignatureVerifier] = (),
    quorum: int = 0,
    origin: str | None = None,
) -> Witnessed:
    """Open a checkpoint signed by the log and cosigned by at least `quorum` witnesses.

    Each configured witness counts once; a cosignature that fails from a
    configured witness key is an error (as a bad log signature is).
    """
    if quorum > len(witnesses):
        raise QuorumError(f"quorum {quorum} exceeds the {len(witnesses)} witness keys configured")
    cp, n = checkpoint.open(note_bytes, log_verifier, witnesses, origin=origin)
    wanted = {(w.name, w.key_id) for w in witnesses}
    cosigners = tuple(sorted({s.name for s in n.sigs if (s.name, s.key_id) in wanted}))
    if len(cosigners) < quorum:
        raise QuorumError(f"{len(cosigners)} of the required {quorum} witness cosignatures")
    return Witnessed(cp, n, cosigners)


def parse_vkeys(vkeys: Iterable[str]) -> list[CosignatureVerifier]:
    """Verifiers for several witness vkeys."""
    return [verifier_from_vkey(v) for v in vkeys]
