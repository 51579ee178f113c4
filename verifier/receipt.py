"""The signed receipt (`pag-receipt/2`): what happened to one request (pure).

A receipt holds the route, verification facts and usage counts in clear, for
auditors, and content only as salted digests: every digest member is

    D(x) = HMAC-SHA256(key = the 32-byte receipt salt, message = x)

as lower-case hex, over the exact bytes (`request_hash`: the body the client
sent; `forwarded_hash`/`provider_request_hash`: the bytes sent upstream;
`provider_response_hash`: the bytes the provider returned; `response_hash`:
the bytes returned to the client, the whole SSE stream when streaming). A
digest of nothing (a refused call forwarded nothing) is `null`. The salt is
per call and goes only to the caller (`x-receipt-salt`), so a log reader
holding a list of guessed prompts can confirm none of them, and two identical
calls have unrelated digests.

`keyset_index` (required) is the log index of the `pag-keyset/1` entry
(verifier/keyset_entry.py) whose `receipt_signing_key` signed the receipt; that
entry precedes the receipt in the log. `shape` checks only that it is a log
index: whether the entry exists, precedes and names the key is for the code
that reads the log.

`sig` is Ed25519 over the RFC 8785 canonical bytes of the object without its
`signature` member; the log entry is the RFC 8785 canonical bytes of the
whole signed receipt. (`pag-receipt/1`, with plain SHA-256 digests, is
retired and refused.)
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import re
import secrets
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

VERSION = "pag-receipt/2"
SALT_SIZE = 32
HEX64 = re.compile(r"[0-9a-f]{64}")
DIGEST_FIELDS = ("request_hash", "forwarded_hash", "provider_request_hash",
                 "provider_response_hash", "response_hash")
REQUIRED = ("v", "id", "time", "gateway", "request_hash", "forwarded_hash", "route",
            "upstream", "provider_request_hash", "provider_response_hash", "response_hash",
            "keyset_index", "e2ee", "signature")


class ReceiptError(ValueError):
    """A malformed receipt, a signature that does not verify, or a digest that does not match."""


def new_salt() -> bytes:
    """A fresh 32-byte receipt salt."""
    return secrets.token_bytes(SALT_SIZE)


def parse_salt(text: str) -> bytes:
    """A receipt salt from its 64-hex-digit form (either case), else ReceiptError."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ReceiptError("receipt salt must be 64 hex digits (32 bytes)")
    return bytes.fromhex(text)


def digest(salt: bytes, data: bytes) -> str:
    """D(data): lower-case hex HMAC-SHA256 keyed with the receipt salt."""
    return hmac.new(salt, data, hashlib.sha256).hexdigest()


def digester(salt: bytes) -> Any:
    """An incremental D(...) (`update(bytes)`, then `hexdigest()`), for streams."""
    return hmac.new(salt, digestmod=hashlib.sha256)


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


def check_shape(receipt: Any) -> None:
    """Raise ReceiptError unless the fixed members are present and well formed."""
    if not isinstance(receipt, dict):
        raise ReceiptError("receipt is not a JSON object")
    missing = [k for k in REQUIRED if k not in receipt]
    if missing:
        raise ReceiptError(f"receipt lacks {', '.join(missing)}")
    if receipt["v"] != VERSION:
        raise ReceiptError(f"unknown receipt version {str(receipt['v'])[:40]!r}")
    for k in DIGEST_FIELDS:
        v = receipt[k]
        if v is not None and not (isinstance(v, str) and HEX64.fullmatch(v)):
            raise ReceiptError(f"{k} is not 64 lower-case hex digits")
    if receipt["request_hash"] is None or receipt["response_hash"] is None:
        raise ReceiptError("request_hash and response_hash are never null")
    for k in ("id", "time"):
        if not isinstance(receipt[k], str):
            raise ReceiptError(f"{k} is not a string")
    for k in ("gateway", "route", "upstream", "e2ee", "signature"):
        if not isinstance(receipt[k], dict):
            raise ReceiptError(f"{k} is not an object")
    if not isinstance(receipt["upstream"].get("verified"), bool):
        raise ReceiptError("upstream.verified is not a boolean")
    ki = receipt["keyset_index"]
    if not isinstance(ki, int) or isinstance(ki, bool) or not 0 <= ki < 2**63:
        raise ReceiptError("keyset_index is not a log index")


def verify(receipt: Any, expected_key: bytes | None = None) -> bytes:
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
    except (binascii.Error, TypeError, ValueError) as e:
        raise ReceiptError("malformed receipt signature") from e
    if len(pub) != 32 or len(raw) != 64:
        raise ReceiptError("malformed receipt signature")
    if expected_key is not None and not hmac.compare_digest(pub, expected_key):
        raise ReceiptError("receipt is signed by a key other than the attested one")
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(raw, signing_bytes(receipt))
    except (InvalidSignature, ValueError, TypeError) as e:
        raise ReceiptError("receipt signature does not verify") from e
    return pub


def check_digest(receipt: dict[str, Any], member: str, salt: bytes, data: bytes) -> None:
    """Raise ReceiptError unless `receipt[member]` is D(data) under `salt`."""
    if member not in DIGEST_FIELDS:
        raise ReceiptError(f"{member} is not a digest member")
    have = receipt.get(member)
    if not isinstance(have, str) or not hmac.compare_digest(have, digest(salt, data)):
        raise ReceiptError(f"{member} does not match the bytes given (or the salt is wrong)")
