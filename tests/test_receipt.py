"""The signed receipt: canonical bytes, signature, shape."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from verifier import receipt


def _body() -> dict:
    def h(data: bytes) -> str:
        return receipt.digest(b"s" * 32, data)

    return {
        "v": receipt.VERSION, "id": "r-1", "time": "2026-11-24T00:00:00Z",
        "gateway": {"app_id": "a", "compose_hash": h(b"c"), "keyset_hash": h(b"k")},
        "request_hash": h(b"req"), "forwarded_hash": h(b"fwd"),
        "route": {"route_id": "r", "model": "m", "provider": "p", "upstream_model": "u"},
        "upstream": {"verified": True, "evidence": "dstack", "binding": "tls-spki:00",
                     "lease_id": "l", "verified_at": "2026-11-24T00:00:00Z",
                     "expires_at": "2026-11-24T00:05:00Z"},
        "provider_request_hash": h(b"preq"), "provider_response_hash": h(b"presp"),
        "response_hash": h(b"resp"), "e2ee": {"mode": "none"}, "usage": {"total_tokens": 3},
        "keyset_index": 0,
    }


def test_sign_verify_roundtrip_and_canonical_entry():
    key = Ed25519PrivateKey.generate()
    r = receipt.sign(_body(), key)
    assert receipt.verify(r, key.public_key().public_bytes_raw()) == key.public_key().public_bytes_raw()
    entry = receipt.entry(r)
    # RFC 8785: sorted keys, no whitespace; member order of the input does not matter
    assert entry == receipt.entry(dict(reversed(list(r.items()))))
    assert b" " not in entry.replace(b"pag-receipt/2", b"")
    assert json.loads(entry) == r


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["route"].__setitem__("provider", "evil"),
        lambda r: r.__setitem__("response_hash", receipt.digest(b"s" * 32, b"other")),
        lambda r: r["upstream"].__setitem__("verified", False),
        lambda r: r.__setitem__("extra", 1),
    ],
)
def test_any_change_breaks_signature(mutate):
    key = Ed25519PrivateKey.generate()
    r = receipt.sign(_body(), key)
    mutate(r)
    with pytest.raises(receipt.ReceiptError, match="does not verify"):
        receipt.verify(r)


def test_wrong_key_and_malformed_refused():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    r = receipt.sign(_body(), key)
    with pytest.raises(receipt.ReceiptError, match="other than the attested"):
        receipt.verify(r, other.public_key().public_bytes_raw())
    bad = dict(r, request_hash="ABC")
    with pytest.raises(receipt.ReceiptError, match="hex"):
        receipt.verify(bad)
    no_sig = dict(r, signature={"alg": "ed25519", "key": "!!", "sig": ""})
    with pytest.raises(receipt.ReceiptError):
        receipt.verify(no_sig)
    missing = {k: v for k, v in r.items() if k != "route"}
    with pytest.raises(receipt.ReceiptError, match="lacks route"):
        receipt.verify(missing)
    # the signature covers everything but itself
    forged = dict(r)
    forged["signature"] = dict(r["signature"], sig=base64.b64encode(b"\0" * 64).decode())
    with pytest.raises(receipt.ReceiptError):
        receipt.verify(forged)


@pytest.mark.parametrize("value", [None, "0", -1, True, 1.0, 2**63])
def test_keyset_index_is_a_required_log_index(value):
    key = Ed25519PrivateKey.generate()
    body = _body()
    with pytest.raises(receipt.ReceiptError):
        receipt.check_shape(receipt.sign({k: v for k, v in body.items()
                                          if k != "keyset_index"}, key))
    with pytest.raises(receipt.ReceiptError, match="keyset_index"):
        receipt.check_shape(dict(receipt.sign(body, key), keyset_index=value))
