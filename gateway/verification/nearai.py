"""The NEAR AI Cloud adapter: its gateway and model attestations, pinned to its TLS key.

The provider serves `GET <attestation_url>?model=&nonce=&signing_algo=&include_tls_fingerprint=true`
(cloud-api's `/v1/attestation/report`): a `gateway_attestation` for the TLS
endpoint the gateway talks to, and `model_attestations` for the inference
backends behind it. Each attestation carries a TDX quote whose report data is
(`report_data`):

    report_data[0:32]  = SHA-256(signing address bytes ‖ TLS fingerprint bytes)
    report_data[32:64] = the caller's nonce (32 raw bytes)

where the TLS fingerprint is the SHA-256 of the endpoint certificate's
SubjectPublicKeyInfo. Before any prompt byte moves the gateway checks, for
every attestation: the quote (`tdx.verify_quote`), the report data against its
own fresh nonce (constant-time), RTMR3 replayed from the event log (which
yields app id and compose hash), and the measurements against the allowed
sets; for every model attestation that it names the route's `upstream_model`
(else `model_mismatch`: a lease binds the model it serves) and the NVIDIA
evidence (`nvidia.check_gpu`); for every attestation, the gateway's and each
model's, the `app_id` and `compose_hash` pins (a gateway and its models
usually run as different apps: pin them together with `allowed_measurements`
sets, e.g. `[{app_id = GATEWAY}, {app_id = MODEL}]`, which every attestation
must match one of); for the gateway attestation the `signing_address` pin. The lease binds `tls-spki:<gateway fingerprint>`, so every connection
to the route must present the attested key. The legacy layout without a TLS
fingerprint (zero-padded address) is refused: it binds no channel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.verification import nvidia, tdx
from gateway.verification.base import (
    Lease,
    Policy,
    VerificationError,
    digest,
    fetch_evidence,
)
from verifier.tee import eventlog

REPORT_PATH = "/v1/attestation/report"


def _hex_bytes(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise ValueError(f"{what} is not hex") from e


def report_data(signing_address: str, tls_fingerprint: str, nonce: str) -> bytes:
    """The 64 bytes NEAR AI puts in a quote: SHA-256(address ‖ fingerprint) ‖ nonce.

    All three are hex text as the report carries them (`0x` optional): the
    address decodes to 20 bytes (ecdsa) or 32 (ed25519; longer is cut to 32,
    as cloud-api does), the fingerprint and the nonce to exactly 32 bytes each.
    Raises ValueError otherwise.
    """
    address = _hex_bytes(signing_address, "signing_address")[:32]
    fingerprint = _hex_bytes(tls_fingerprint, "tls_cert_fingerprint")
    raw_nonce = _hex_bytes(nonce, "nonce")
    if not address:
        raise ValueError("signing_address is empty")
    if len(fingerprint) != 32 or len(raw_nonce) != 32:
        raise ValueError("tls_cert_fingerprint and nonce must be 32 bytes each")
    return hashlib.sha256(address + fingerprint).digest() + raw_nonce


@dataclass(frozen=True)
class Attestation:
    """One attested component of a report (the gateway, or one model backend)."""

    name: str
    model: str
    signing_address: str
    tls_fingerprint: str
    quote: bytes
    event_log: Any
    nvidia_payload: Any = None


def _attestation(obj: Any, name: str) -> Attestation:
    if not isinstance(obj, dict):
        raise ValueError(f"{name} is not an object")
    for key in ("signing_address", "intel_quote"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ValueError(f"{name}.{key} missing")
    fp = obj.get("tls_cert_fingerprint")
    if not isinstance(fp, str) or len(_hex_bytes(fp, f"{name}.tls_cert_fingerprint")) != 32:
        raise ValueError(f"{name}.tls_cert_fingerprint missing or not 32 bytes "
                         "(a report without it binds no TLS channel)")
    if obj.get("event_log") in (None, "", []):
        raise ValueError(f"{name}.event_log missing")
    model = obj.get("model_name")
    return Attestation(name=name, model=model if isinstance(model, str) else "",
                       signing_address=obj["signing_address"], tls_fingerprint=fp.lower(),
                       quote=_hex_bytes(obj["intel_quote"], f"{name}.intel_quote"),
                       event_log=obj["event_log"], nvidia_payload=obj.get("nvidia_payload"))


def parse_report(doc: Any) -> tuple[Attestation, list[Attestation]]:
    """(gateway attestation, model attestations) of a report; ValueError if malformed."""
    if not isinstance(doc, dict):
        raise ValueError("report is not a JSON object")
    gateway = _attestation(doc.get("gateway_attestation"), "gateway_attestation")
    models = doc.get("model_attestations", [])
    if not isinstance(models, list):
        raise ValueError("model_attestations is not a list")
    return gateway, [_attestation(m, f"model_attestations[{i}]") for i, m in enumerate(models)]


async def check_attestation(a: Attestation, nonce: str, policy: Policy, now: float
                            ) -> dict[str, Any]:
    """Verify one attestation (quote, report data, RTMR3, measurements); its facts."""
    vq = await tdx.verify_quote(a.quote, policy, now)
    try:
        expected = report_data(a.signing_address, a.tls_fingerprint, nonce)
    except ValueError as e:
        raise VerificationError("evidence_malformed", f"{a.name}: {e}") from e
    if not tdx.same(vq.report_data, expected):
        raise VerificationError("binding_mismatch", f"{a.name}: report data does not bind its "
                                "signing address, TLS fingerprint and our nonce")
    try:
        replay = eventlog.replay(a.event_log)
    except ValueError as e:  # EventLogError included
        raise VerificationError("evidence_malformed", f"{a.name}: event log: {e}") from e
    if not tdx.same(replay.rtmr3, vq.quote.report.rtmr3):
        raise VerificationError("quote_invalid", f"{a.name}: event log does not replay to RTMR3")
    have = dict(vq.measurements(), app_id=replay.app_id, compose_hash=replay.compose_hash)
    if not tdx.measurements_ok(have, policy):
        raise VerificationError("measurement_mismatch",
                                f"{a.name}: measurements not in the allowed sets")
    return {"signing_address": a.signing_address, "tls_spki_sha256": a.tls_fingerprint,
            "mr_td": have["mr_td"], "app_id": replay.app_id,
            "compose_hash": replay.compose_hash, "tcb_status": vq.tcb_status,
            "simulated": vq.simulated}


def _pins_ok(facts: dict[str, Any], policy: Policy, who: str = "gateway") -> None:
    """An attestation against the policy's app id and compose hash pins (every attestation:
    the gateway's and each model's) and, for the gateway's, the signer pin."""
    for key in ("app_id", "compose_hash"):
        want = getattr(policy, key)
        if want and str(facts[key] or "").lower() != want.lower().removeprefix("0x"):
            raise VerificationError("measurement_mismatch", f"{who} {key} is not the pinned one")
    pin = policy.signing_address
    if who == "gateway" and pin and _norm_address(facts["signing_address"]) != _norm_address(pin):
        raise VerificationError("binding_mismatch", "gateway signing address is not the pinned one")


def _norm_address(value: str) -> str:
    return value.lower().removeprefix("0x")


def signing_algo(policy: Policy) -> str:
    """`ed25519` if the pinned signer is a 32-byte key, else `ecdsa` (a 20-byte address)."""
    pin = policy.signing_address
    return "ed25519" if pin and len(_norm_address(pin)) == 64 else "ecdsa"


async def verify(client: httpx.AsyncClient, route: Any, policy: Policy, now: float) -> Lease:
    """Verify a NEAR AI Cloud route; a Lease binding the gateway's TLS key, or VerificationError."""
    base = urlsplit(route.base_url)
    if base.scheme != "https":
        raise VerificationError("binding_mismatch",
                                "route is not HTTPS: the attested TLS key cannot be pinned")
    url = route.attestation_url or f"https://{base.netloc}{REPORT_PATH}"
    nonce = secrets.token_hex(32)
    raw, _ = await fetch_evidence(client, url, {"model": route.upstream_model, "nonce": nonce,
                                     "signing_algo": signing_algo(policy),
                                     "include_tls_fingerprint": "true"})
    try:
        gateway, models = parse_report(json.loads(raw))
    except ValueError as e:
        raise VerificationError("evidence_malformed", f"attestation report: {e}") from e
    if not models:
        raise VerificationError("evidence_missing", "report has no model attestation")
    facts = await check_attestation(gateway, nonce, policy, now)
    _pins_ok(facts, policy)
    model_facts = []
    for m in models:
        mf = await check_attestation(m, nonce, policy, now)
        if m.model != route.upstream_model:
            raise VerificationError("model_mismatch", f"{m.name} attests model {m.model[:80]!r}, "
                                    f"not the route's {route.upstream_model[:80]!r}")
        _pins_ok(mf, policy, m.name)
        mf["model"] = m.model
        mf["gpu"] = nvidia.check_gpu(m.nvidia_payload, nonce, policy)
        model_facts.append(mf)
    simulated = facts["simulated"] or any(mf["simulated"] for mf in model_facts)
    facts.update(simulated=simulated, models=model_facts,
                 gpu=[mf["gpu"].get("gpu") for mf in model_facts])
    return Lease(route_id=route.id, provider=route.provider,
                 evidence="nearai-simulated" if simulated else "nearai",
                 evidence_digest=digest(raw), binding=f"tls-spki:{gateway.tls_fingerprint}",
                 verified_at=now, expires_at=now + policy.max_lease_age, facts=facts,
                 nonce=nonce, document_b64=base64.b64encode(raw).decode())
