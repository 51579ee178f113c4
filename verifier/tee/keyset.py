"""The attested keyset: the gateway's public keys, as clients see and pin them (pure).

`keyset` is a JSON object with exactly the members `KEYSET_FIELDS`:
`receipt_signing_key` (base64 of the raw 32-byte Ed25519 key),
`e2ee_public_key` (base64 of the raw 32-byte X25519 key), `tls_spki_sha256`
(lower-case hex SHA-256 of the TLS key's DER SubjectPublicKeyInfo) and
`log_vkey` (the transparency log's signed-note verifier key, "" if none).
`keyset_hash` is the lower-case hex SHA-256 of its RFC 8785 bytes; the
attestation's report data commits to it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization

KEYSET_FIELDS = ("receipt_signing_key", "e2ee_public_key", "tls_spki_sha256", "log_vkey")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class KeysetError(ValueError):
    """A keyset object is malformed."""


def spki_sha256(public_key: Any) -> str:
    """Lower-case hex SHA-256 of a public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Keyset:
    """The attested public keyset (exactly the four `KEYSET_FIELDS`)."""

    receipt_signing_key: str  # base64 of the raw 32-byte Ed25519 public key
    e2ee_public_key: str  # base64 of the raw 32-byte X25519 public key
    tls_spki_sha256: str  # lower-case hex SHA-256 of the TLS key's DER SPKI
    log_vkey: str  # the transparency log's signed-note verifier key ("" if none)

    def to_json(self) -> dict[str, str]:
        """The JSON object served as `keyset`."""
        return {f: getattr(self, f) for f in KEYSET_FIELDS}

    def canonical_bytes(self) -> bytes:
        """RFC 8785 bytes of `to_json()`."""
        return rfc8785.dumps(self.to_json())

    def keyset_hash(self) -> str:
        """Lower-case hex SHA-256 of the RFC 8785 bytes of `to_json()`."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def from_json(cls, obj: Any) -> Keyset:
        """Validate and load a keyset object (exact member set, well-formed values)."""
        if not isinstance(obj, dict) or set(obj) != set(KEYSET_FIELDS):
            raise KeysetError(f"keyset must be an object with exactly {list(KEYSET_FIELDS)}")
        if not all(isinstance(obj[f], str) for f in KEYSET_FIELDS):
            raise KeysetError("keyset members must be strings")
        for f in ("receipt_signing_key", "e2ee_public_key"):
            try:
                raw = base64.b64decode(obj[f], validate=True)
            except ValueError as e:
                raise KeysetError(f"keyset {f} is not base64") from e
            if len(raw) != 32:
                raise KeysetError(f"keyset {f} must be 32 bytes")
        if not _HEX64.fullmatch(obj["tls_spki_sha256"]):
            raise KeysetError("keyset tls_spki_sha256 must be 64 lower-case hex digits")
        return cls(**{f: obj[f] for f in KEYSET_FIELDS})


def keyset_hash(obj: dict[str, Any]) -> str:
    """Lower-case hex SHA-256 of the RFC 8785 bytes of any keyset-like object."""
    return hashlib.sha256(rfc8785.dumps(obj)).hexdigest()
