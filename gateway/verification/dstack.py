"""The dstack / Intel TDX adapter (the reference evidence kind).

The provider serves `GET <attestation_url>?nonce=<hex>` in the gateway's own
attestation shape. The gateway checks, before any prompt byte moves:
the quote (simulated quotes only under `allow_simulated`; real quotes
verified offline by dcap-qvl against collateral, TCB status in policy), the
report data binding the provider's keyset and our fresh nonce, RTMR3
replayed from the event payloads (app id, compose hash), the measurements
against the allowed sets, and that the route is reached over TLS whose key
is the attested one (the lease binds `tls-spki:<keyset.tls_spki_sha256>`), or, on a
route with `e2ee = true` over plain HTTP, that every request is sealed to the
attested E2EE key (`e2ee-key:<keyset.e2ee_public_key>`). The lease carries that
key either way, for routes that seal to the provider.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.verification import collateral, tdx
from gateway.verification.base import (
    Lease,
    Policy,
    VerificationError,
    digest,
    fetch_evidence,
)
from verifier.tee import attestation
from verifier.tee import quote as tdxquote


def quote_verifier(policy: Policy, now: float, col: Any = None):  # noqa: ANN201
    """A synchronous dcap-qvl check for attestation.check (collateral given or from the file)."""

    def verify(raw: bytes) -> Any:
        nonlocal col
        if col is None:
            if not policy.collateral_file:
                raise VerificationError("quote_invalid", "no collateral configured for real quotes")
            try:
                col = collateral.load(Path(policy.collateral_file).read_text())
            except OSError as e:
                raise VerificationError("quote_invalid", f"collateral: {e.strerror}") from e
        return tdx.check_real(raw, tdx.parse(raw), col, policy, now)

    return verify


def _measurements_ok(facts: attestation.AttestationFacts, policy: Policy) -> bool:
    have = {"mr_td": facts.mr_td, "rtmr0": facts.rtmrs[0], "rtmr1": facts.rtmrs[1],
            "rtmr2": facts.rtmrs[2], "rtmr3": facts.rtmrs[3], "compose_hash": facts.compose_hash,
            "app_id": facts.app_id}
    return tdx.measurements_ok(have, policy)


async def verify(client: httpx.AsyncClient, route: Any, policy: Policy, now: float) -> Lease:
    """Verify a dstack provider; a Lease or VerificationError."""
    url = route.attestation_url or _default_attestation_url(route.base_url)
    nonce = secrets.token_hex(32)
    body, _ = await fetch_evidence(client, url, {"nonce": nonce})
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise VerificationError("evidence_malformed", f"attestation is not JSON: {e}") from e
    col = await _collateral(doc, policy)
    try:
        facts = attestation.check(doc, nonce=nonce, allow_simulated=policy.allow_simulated,
                                  expected_app_id=policy.app_id,
                                  expected_compose_hash=policy.compose_hash,
                                  verify_quote=quote_verifier(policy, now, col))
    except attestation.AttestationError as e:
        cause = e.__cause__
        if isinstance(cause, VerificationError):
            raise VerificationError(cause.code, cause.reason) from e
        code = {"simulated_not_allowed": "simulated_not_allowed", "malformed": "evidence_malformed",
                "app_id_mismatch": "measurement_mismatch",
                "compose_hash_mismatch": "measurement_mismatch"}.get(e.code, "quote_invalid")
        raise VerificationError(code, f"{e.code}: {e}") from e
    if policy.key_provider_id is not None:
        kp = facts.key_provider or {}
        if str(kp.get("id", "")).lower() != policy.key_provider_id.lower():
            raise VerificationError("measurement_mismatch",
                                    "key-provider event does not name the pinned key provider")
    if not _measurements_ok(facts, policy):
        raise VerificationError("measurement_mismatch", "measurements not in the allowed sets")
    if urlsplit(route.base_url).scheme == "https":
        binding = f"tls-spki:{facts.keyset['tls_spki_sha256']}"
    elif getattr(route, "e2ee", False):  # sealed to the attested E2EE key instead of TLS
        binding = f"e2ee-key:{facts.keyset['e2ee_public_key']}"
    else:
        raise VerificationError("binding_mismatch", "route is neither HTTPS (the attested "
                                "TLS key cannot be pinned) nor sealed to the E2EE key")
    return Lease(route_id=route.id, provider=route.provider, evidence="dstack" +
                 ("-simulated" if facts.simulated else ""),
                 evidence_digest=digest(body), binding=binding,
                 verified_at=now, expires_at=now + policy.max_lease_age,
                 nonce=nonce, document_b64=base64.b64encode(body).decode(),
                 facts={"app_id": facts.app_id, "compose_hash": facts.compose_hash,
                        "mr_td": facts.mr_td, "simulated": facts.simulated,
                        "tcb_status": getattr(facts.quote_verification, "tcb_status", None),
                        "key_provider": facts.key_provider,
                        "keyset_hash": facts.keyset_hash,
                        "e2ee_public_key": facts.keyset["e2ee_public_key"]})


async def _collateral(doc: dict[str, Any], policy: Policy) -> Any:
    """Collateral for a real quote (None for simulated or unparsable ones: check refuses those)."""
    q = doc.get("quote")
    try:
        raw = bytes.fromhex(q) if isinstance(q, str) else b""
        tdx.parse(raw)
    except (ValueError, VerificationError):
        return None
    if tdxquote.is_simulated(raw) or tdxquote.looks_simulated(raw):
        return None
    return await collateral.for_quote(raw, policy)


def _default_attestation_url(base_url: str) -> str:
    u = urlsplit(base_url)
    return f"{u.scheme}://{u.netloc}/.well-known/attestation"
