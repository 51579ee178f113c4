"""C2SP signed-note: Ed25519 signed text, key names, key IDs and vkeys.

A note is UTF-8 text ending in a newline, then a blank line, then one or more
signature lines `— <name> <base64(key ID || signature)>`. The key ID is the
first 4 bytes of SHA-256(name || 0x0A || alg || public key); Ed25519 note
signatures have alg 0x01. A vkey is `<name>+<hex key ID>+<base64(alg || key)>`.

Rules enforced by `open` (as Go's golang.org/x/mod/sumdb/note does):
- the text holds no control characters but newline and is valid UTF-8;
- a signature from a known key (name and key ID) that fails is an error;
- unknown signatures are kept aside, never trusted;
- at least one known key must have signed;
- at most MAX_SIGNATURES signature lines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
MAX_NOTE_SIZE = 1 << 20
SIG_PREFIX = "\u2014 ".encode()


class NoteError(ValueError):
    """A malformed note, key or signature line."""


class InvalidNoteSignature(NoteError):
    """A known key's signature on the note does not verify."""


class UnverifiedNote(NoteError):
    """No signature on the note is from a known key."""


class Signer(Protocol):
    """Anything that can sign note text under a name and key ID."""

    name: str
    key_id: bytes

    def sign(self, text: bytes) -> bytes: ...


class Verifier(Protocol):
    """Anything that can check a signature by its name and key ID."""

    name: str
    key_id: bytes

    def verify(self, text: bytes, sig: bytes) -> bool: ...


def valid_name(name: str) -> bool:
    """A key name is non-empty, has no whitespace and no '+'."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def key_id(name: str, alg: int, public_key: bytes) -> bytes:
    """First 4 bytes of SHA-256(name || 0x0A || alg || public key)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()[:4]


def format_vkey(name: str, alg: int, public_key: bytes) -> str:
    """`name+hexid+base64(alg||key)`."""
    if not valid_name(name):
        raise NoteError(f"invalid key name {name!r}")
    kid = key_id(name, alg, public_key).hex()
    return f"{name}+{kid}+{base64.b64encode(bytes([alg]) + public_key).decode()}"


def parse_vkey(vkey: str) -> tuple[str, bytes, int, bytes]:
    """Split a vkey into (name, key ID, alg, public key), checking the key ID."""
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError("vkey must be name+hexid+base64key")
    name, hexid, b64 = parts
    if not valid_name(name) or len(hexid) != 8:
        raise NoteError("malformed vkey")
    try:
        kid = bytes.fromhex(hexid)
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error) as e:
        raise NoteError("malformed vkey") from e
    if len(raw) < 2:
        raise NoteError("malformed vkey")
    alg, pub = raw[0], raw[1:]
    if key_id(name, alg, pub) != kid:
        raise NoteError("vkey key ID does not match its key")
    return name, kid, alg, pub


@dataclass(frozen=True)
class Ed25519Verifier:
    """Verifies alg 0x01 note signatures."""

    name: str
    key_id: bytes
    public_key: bytes

    def verify(self, text: bytes, sig: bytes) -> bool:
        if len(sig) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(sig, text)
        except InvalidSignature:
            return False
        return True

    @property
    def vkey(self) -> str:
        return format_vkey(self.name, ALG_ED25519, self.public_key)


class Ed25519Signer:
    """Signs notes with an Ed25519 key (alg 0x01)."""

    def __init__(self, name: str, seed: bytes) -> None:
        if not valid_name(name):
            raise NoteError(f"invalid key name {name!r}")
        if len(seed) != 32:
            raise NoteError("Ed25519 seed must be 32 bytes")
        self.name = name
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._seed = seed
        self.public_key = self._key.public_key().public_bytes_raw()
        self.key_id = key_id(name, ALG_ED25519, self.public_key)

    def sign(self, text: bytes) -> bytes:
        return self._key.sign(text)

    @property
    def vkey(self) -> str:
        return format_vkey(self.name, ALG_ED25519, self.public_key)

    @property
    def skey(self) -> str:
        """`PRIVATE+KEY+name+hexid+base64(alg||seed)`, Go's note skey format."""
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self._seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{b64}"

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier(self.name, self.key_id, self.public_key)


def generate_signer(name: str) -> Ed25519Signer:
    """A new random Ed25519 note signer."""
    return Ed25519Signer(name, os.urandom(32))


def parse_skey(skey: str) -> Ed25519Signer:
    """Load an Ed25519 signer from Go's skey format."""
    parts = skey.strip().split("+", 4)
    if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
        raise NoteError("malformed skey")
    try:
        raw = base64.b64decode(parts[4], validate=True)
    except ValueError as e:  # binascii.Error, or a str with non-ASCII characters
        raise NoteError("malformed skey") from e
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise NoteError("skey is not an Ed25519 note key")
    signer = Ed25519Signer(parts[2], raw[1:])
    if signer.key_id.hex() != parts[3]:
        raise NoteError("skey key ID does not match its key")
    return signer


def verifier_from_vkey(vkey: str) -> Ed25519Verifier:
    """An alg 0x01 verifier from a vkey."""
    name, kid, alg, pub = parse_vkey(vkey)
    if alg != ALG_ED25519 or len(pub) != 32:
        raise NoteError("vkey is not an Ed25519 note key")
    return Ed25519Verifier(name, kid, pub)


@dataclass(frozen=True)
class Signature:
    """One signature line: key name, key ID, raw signature (without the ID)."""

    name: str
    key_id: bytes
    sig: bytes

    def line(self) -> bytes:
        b64 = base64.b64encode(self.key_id + self.sig).decode()
        return SIG_PREFIX + f"{self.name} {b64}\n".encode()


@dataclass
class Note:
    """An opened note: its text and its verified and unknown signatures."""

    text: bytes
    sigs: list[Signature] = field(default_factory=list)
    unverified: list[Signature] = field(default_factory=list)


def _check_text(msg: bytes) -> None:
    try:
        s = msg.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NoteError("note is not valid UTF-8") from e
    for ch in s:
        if ch < " " and ch != "\n":
            raise NoteError("note contains a control character")


def sign(text: bytes, signers: Iterable[Signer], extra: Sequence[Signature] = ()) -> bytes:
    """Sign `text` (which must end in a newline) with every signer.

    `extra` signatures (for instance cosignatures already held) are appended
    after the new ones, skipping duplicates of a signer's name and key ID.
    """
    if not text.endswith(b"\n"):
        raise NoteError("note text must end in a newline")
    if b"\n\n" in text:
        raise NoteError("note text must not contain a blank line")
    _check_text(text)
    sigs = [Signature(s.name, s.key_id, s.sign(text)) for s in signers]
    seen = {(s.name, s.key_id) for s in sigs}
    sigs += [s for s in extra if (s.name, s.key_id) not in seen]
    return text + b"\n" + b"".join(s.line() for s in sigs)


def split(msg: bytes) -> tuple[bytes, list[Signature]]:
    """Split a note into its text and signature lines, checking the syntax only."""
    if len(msg) > MAX_NOTE_SIZE:
        raise NoteError("note too large")
    _check_text(msg)
    cut = msg.rfind(b"\n\n")
    if cut < 0:
        raise NoteError("note has no signature block")
    text, block = msg[: cut + 1], msg[cut + 2 :]
    if not block or not block.endswith(b"\n"):
        raise NoteError("signature block must end in a newline")
    sigs: list[Signature] = []
    for line in block[:-1].split(b"\n"):
        if not line.startswith(SIG_PREFIX):
            raise NoteError("malformed signature line")
        name, sp, b64 = line[len(SIG_PREFIX) :].decode().partition(" ")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError as e:  # binascii.Error, or a str with non-ASCII characters
            raise NoteError("malformed signature") from e
        if not sp or not valid_name(name) or len(raw) < 5:
            raise NoteError("malformed signature line")
        sigs.append(Signature(name, raw[:4], raw[4:]))
        if len(sigs) > MAX_SIGNATURES:
            raise NoteError("too many signatures")
    return text, sigs


def open(msg: bytes, verifiers: Iterable[Verifier]) -> Note:  # noqa: A001 - mirrors note.Open
    """Parse and verify a note; see the module docstring for the rules."""
    text, sigs = split(msg)
    known = {(v.name, v.key_id): v for v in verifiers}
    note = Note(text)
    seen: set[tuple[str, bytes]] = set()
    for s in sigs:
        v = known.get((s.name, s.key_id))
        if v is None:
            if s not in note.unverified:
                note.unverified.append(s)
            continue
        if (s.name, s.key_id) in seen:
            continue
        if not v.verify(text, s.sig):
            raise InvalidNoteSignature(f"invalid signature for key {s.name}")
        seen.add((s.name, s.key_id))
        note.sigs.append(s)
    if not note.sigs:
        raise UnverifiedNote("note has no verifiable signature")
    return note
