"""The signed receipt (`pag-receipt/1`): what happened to one request.

A receipt is a JSON object holding only hashes, the route, verification facts
and usage counts, never prompt or completion text. `sig` is Ed25519 over the
RFC 8785 canonical bytes of the object without its `signature` member; the
log entry is the RFC 8785 canonical bytes of the whole signed receipt.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import re
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

VERSION = "pag-receipt/1"
HEX64 = re.compile(r"[0-9a-f]{64}")
HASH_FIELDS = ("request_hash", "forwarded_hash", "provider_request_hash",
               "provider_response_hash", "response_hash")
REQUIRED = ("v", "id", "time", "gateway", "request_hash", "forwarded_hash", "route",
            "upstream", "response_hash", "e2ee", "signature")


class ReceiptError(ValueError):
    """A malformed receipt or a signature that does not verify."""


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256, the HEX of every receipt hash field."""
    return hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes."""
    return rfc8785.dumps(obj)


def signing_bytes(receipt: dict[str, Any]) -> bytes:
    """The bytes the signature covers: the receipt without `signature`."""
    return canonical({k: v for k, v in receipt.items() if k != "signature"})


def sign(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of `body` with its `signature` member added."""
    if "signature" in body:
        raise ReceiptError("receipt is already signed")
    out = copy.deepcopy(body)
    pub = key.public_key().public_bytes_raw()
    out["signature"] = {
        "alg": "ed25519",
        "key": base64.b64encode(pub).decode(),
        "sig": base64.b64encode(key.sign(signing_bytes(body))).decode(),
    }
    return out


def entry(receipt: dict[str, Any]) -> bytes:
    """The log entry for a signed receipt."""
    return canonical(receipt)


def check_shape(receipt: dict[str, Any]) -> None:
    """Raise ReceiptError unless the fixed members are present and well formed."""
    if not isinstance(receipt, dict):
        raise ReceiptError("receipt is not a JSON object")
    missing = [k for k in REQUIRED if k not in receipt]
    if missing:
        raise ReceiptError(f"receipt lacks {', '.join(missing)}")
    if receipt["v"] != VERSION:
        raise ReceiptError(f"unknown receipt version {receipt['v']!r}")
    for k in HASH_FIELDS:
        v = receipt.get(k)
        if v is not None and not (isinstance(v, str) and HEX64.fullmatch(v)):
            raise ReceiptError(f"{k} is not lower-case hex SHA-256")
    for k in ("gateway", "route", "upstream", "e2ee", "signature"):
        if not isinstance(receipt[k], dict):
            raise ReceiptError(f"{k} is not an object")
    if not isinstance(receipt["upstream"].get("verified"), bool):
        raise ReceiptError("upstream.verified is not a boolean")


def verify(receipt: dict[str, Any], expected_key: bytes | None = None) -> bytes:
    """Check shape and signature; return the raw Ed25519 public key that signed.

    With `expected_key` (the attested receipt_signing_key), any other key fails.
    """
    check_shape(receipt)
    sig = receipt["signature"]
    if sig.get("alg") != "ed25519":
        raise ReceiptError("unsupported receipt signature algorithm")
    try:
        pub = base64.b64decode(sig.get("key", ""), validate=True)
        raw = base64.b64decode(sig.get("sig", ""), validate=True)
    except (binascii.Error, TypeError) as e:
        raise ReceiptError("malformed receipt signature") from e
    if len(pub) != 32 or len(raw) != 64:
        raise ReceiptError("malformed receipt signature")
    if expected_key is not None and pub != expected_key:
        raise ReceiptError("receipt is signed by a key other than the attested one")
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(raw, signing_bytes(receipt))
    except InvalidSignature as e:
        raise ReceiptError("receipt signature does not verify") from e
    return pub
