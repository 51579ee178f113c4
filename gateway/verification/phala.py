"""The Phala adapter: providers running the private-ml-sdk `vllm-proxy` (RedPill).

The gateway asks `GET <attestation_url>?model=<upstream_model>&nonce=<64 hex>
&signing_algo=ecdsa&include_tls_fingerprint=true` with a fresh random nonce and
reads the fields `signing_address` (0x + 40 hex, the per-boot key that signs
responses), `intel_quote` (hex TDX quote), `nvidia_payload` (JSON text),
`event_log` and, from proxies that support it, `tls_cert_fingerprint` (hex
SHA-256 of the TLS certificate's SubjectPublicKeyInfo). A route must set
`attestation_url` to the proxy's `.../v1/attestation/report`.

The 64 bytes of TDX report data are, exactly as the proxy builds them:

* plain: `address (20 bytes) || 12 zero bytes || nonce (32 bytes)`;
* with a TLS fingerprint: `SHA-256(address || spki_sha256) || nonce`.

Before any prompt byte moves the gateway checks: the quote (`tdx.verify_quote`),
report data equal to the layout above for OUR nonce (constant time), RTMR3
replayed from the event log (app id / compose hash against the policy), that the
report's `model_name` is the route's `upstream_model` (else `model_mismatch`: a
lease binds the model it serves), the measurements against the allowed sets, the GPU evidence bound to the same
nonce (`nvidia.check_gpu`), and the optional `signing_address` pin. The lease
binds `tls-spki:<fingerprint>` when the report carries one (and the route is
HTTPS), else `signing-address:<0x...>`: a key the gateway cannot check before
sending, only afterwards, on each response signature
(`verify_response_signature`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

import httpx
from Crypto.Hash import keccak
from eth_keys import keys
from eth_keys.exceptions import BadSignature, ValidationError

from gateway.verification import nvidia, tdx
from gateway.verification.base import (
    SIGNATURE_BINDING,
    Lease,
    Policy,
    VerificationError,
    digest,
    fetch_evidence,
)
from verifier.tee import eventlog

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def expected_report_data(signing_address: str, nonce: bytes,
                         tls_spki_sha256: str | None = None) -> bytes:
    """The 64 report-data bytes a vllm-proxy quote carries for this address and nonce."""
    address = bytes.fromhex(signing_address[2:])
    if tls_spki_sha256 is None:
        return address.ljust(32, b"\x00") + nonce
    return hashlib.sha256(address + bytes.fromhex(tls_spki_sha256)).digest() + nonce


def verify_response_signature(text: str, signature_hex: str, signing_address: str) -> bool:
    """True iff `signature_hex` is an Ethereum personal_sign of `text` by `signing_address`.

    `text` is what `/v1/signature/{id}` returns (`<sha256 request>:<sha256 response>`);
    the signature is 65 bytes r || s || v (v 27/28 or 0/1), hex with or without 0x.
    """
    try:
        sig = bytes.fromhex(signature_hex.removeprefix("0x"))
        if len(sig) != 65 or not _ADDRESS.fullmatch(signing_address):
            return False
        v = sig[64] - 27 if sig[64] >= 27 else sig[64]
        message = text.encode()
        prefixed = b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message
        public = keys.Signature(sig[:64] + bytes([v])).recover_public_key_from_msg_hash(
            _keccak256(prefixed))
    except (ValueError, BadSignature, ValidationError):
        return False
    return tdx.same(_keccak256(public.to_bytes())[-20:], bytes.fromhex(signing_address[2:]))


async def fetch_signature(client: httpx.AsyncClient, route: Any, chat_id: str) -> dict[str, Any]:
    """The provider's `GET <base_url>/signature/<id>` document (text, signature, address).

    Raises httpx.HTTPError or ValueError when it is unavailable, not 200, over 64 KiB or
    not a JSON object; checking it is the caller's job (`verify_response_signature`).
    """
    headers = {"Authorization": f"Bearer {route.api_key}"} if getattr(route, "api_key", "") else {}
    r = await client.get(f"{route.base_url}/signature/{chat_id}", timeout=route.timeout,
                         headers=headers,
                         params={"model": route.upstream_model, "signing_algo": "ecdsa"})
    if r.status_code != 200 or len(r.content) > 1 << 16:
        raise ValueError(f"signature endpoint answered {r.status_code}")
    doc = json.loads(r.content)
    if not isinstance(doc, dict):
        raise ValueError("signature document is not a JSON object")
    return doc


async def verify(client: httpx.AsyncClient, route: Any, policy: Policy, now: float) -> Lease:
    """Verify a vllm-proxy provider; a Lease or VerificationError."""
    nonce = secrets.token_bytes(32)
    body = await _fetch(client, route, nonce)
    doc = _parse(body)
    address = doc["signing_address"]
    if policy.signing_address and policy.signing_address.lower() != address.lower():
        raise VerificationError("binding_mismatch",
                                f"signing address {address} is not the pinned one")
    try:
        raw = bytes.fromhex(doc["intel_quote"])
    except ValueError as e:
        raise VerificationError("evidence_malformed", "intel_quote is not hex") from e
    vq = await tdx.verify_quote(raw, policy, now)
    fingerprint = doc.get("tls_cert_fingerprint")
    fingerprint = fingerprint.lower() if fingerprint else None
    if not tdx.same(vq.report_data, expected_report_data(address, nonce, fingerprint)):
        raise VerificationError("binding_mismatch",
                                "report data does not bind the signing address"
                                + (" and TLS key" if fingerprint else "") + " to our nonce")
    identity = _identity(doc.get("event_log"), vq, policy)
    model = doc.get("model_name")
    if model != route.upstream_model:
        raise VerificationError("model_mismatch", f"report is for model {str(model)[:80]!r}, "
                                f"not the route's {route.upstream_model[:80]!r}")
    if not tdx.measurements_ok(vq.measurements(), policy):
        raise VerificationError("measurement_mismatch", "measurements not in the allowed sets")
    gpu = nvidia.check_gpu(doc.get("nvidia_payload"), nonce.hex(), policy)
    if fingerprint is None:
        if not policy.allow_signature_binding:
            raise VerificationError("binding_mismatch", "report binds no TLS key: the channel "
                                    "cannot be pinned before sending (allow_signature_binding "
                                    "accepts a response-signing key instead)")
        binding = SIGNATURE_BINDING + address.lower()
    elif urlsplit(route.base_url).scheme != "https":
        raise VerificationError("binding_mismatch",
                                "route is not HTTPS: the attested TLS key cannot be pinned")
    else:
        binding = f"tls-spki:{fingerprint}"
    return Lease(route_id=route.id, provider=route.provider,
                 evidence="phala-simulated" if vq.simulated else "phala",
                 evidence_digest=digest(body), binding=binding, verified_at=now,
                 expires_at=now + policy.max_lease_age, nonce=nonce.hex(),
                 document_b64=base64.b64encode(body).decode(),
                 facts={"signing_address": address.lower(), "mr_td": vq.measurements()["mr_td"],
                        "tcb_status": vq.tcb_status, "simulated": vq.simulated, **identity, **gpu})


async def _fetch(client: httpx.AsyncClient, route: Any, nonce: bytes) -> bytes:
    """The attestation body for our nonce (at most MAX_EVIDENCE bytes)."""
    params = {"model": route.upstream_model, "nonce": nonce.hex(), "signing_algo": "ecdsa",
              "include_tls_fingerprint": "true"}
    body, _ = await fetch_evidence(client, route.attestation_url, params)
    return body


def _parse(body: bytes) -> dict[str, Any]:
    """The report object with its required fields checked; `evidence_malformed` otherwise."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise VerificationError("evidence_malformed", f"attestation is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise VerificationError("evidence_malformed", "attestation is not a JSON object")
    if not isinstance(doc.get("signing_address"), str) or not _ADDRESS.fullmatch(
            doc["signing_address"]):
        raise VerificationError("evidence_malformed", "signing_address is not an 0x address")
    if doc.get("signing_algo", "ecdsa") != "ecdsa":
        raise VerificationError("evidence_malformed", "signing_algo is not ecdsa")
    if not isinstance(doc.get("intel_quote"), str):
        raise VerificationError("evidence_malformed", "intel_quote missing")
    fp = doc.get("tls_cert_fingerprint")
    if fp is not None and not (isinstance(fp, str) and _SHA256_HEX.fullmatch(fp)):
        raise VerificationError("evidence_malformed", "tls_cert_fingerprint is not a SHA-256 hex")
    return doc


def _identity(event_log: Any, vq: tdx.VerifiedQuote, policy: Policy) -> dict[str, Any]:
    """app id and compose hash from the event log, whose RTMR3 replay must match the quote."""
    if event_log is None:
        if policy.app_id or policy.compose_hash:
            raise VerificationError("evidence_missing",
                                    "policy pins app_id/compose_hash but the report has no event log")
        return {}
    try:
        replay = eventlog.replay(event_log)
    except (eventlog.EventLogError, TypeError, ValueError) as e:
        raise VerificationError("evidence_malformed", f"event log: {e}") from e
    if not tdx.same(replay.rtmr3, vq.quote.report.rtmr3):
        raise VerificationError("measurement_mismatch", "event log does not replay to RTMR3")
    for name, want in (("app_id", policy.app_id), ("compose_hash", policy.compose_hash)):
        if want and (getattr(replay, name) or "").lower() != want.lower():
            raise VerificationError("measurement_mismatch", f"{name} is not the pinned one")
    return {"app_id": replay.app_id, "compose_hash": replay.compose_hash}


def _keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()
