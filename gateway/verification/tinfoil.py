"""The Tinfoil adapter: an enclave's TDX quote against a Sigstore-signed release.

Wire format (tinfoilsh/verifier `attestation/`, tinfoilsh/tinfoil-python):
`GET https://<enclave>/.well-known/tinfoil-attestation` answers
`{"format": <predicate URL>, "body": base64(gzip(report))}`. For format
`https://tinfoil.sh/predicate/tdx-guest/v2` the report is a TDX quote whose
report data is `SHA-256(TLS SubjectPublicKeyInfo DER) (32 B) || HPKE public
key (32 B)`; `sev-snp-guest/v2` (an AMD SEV-SNP report) is not verified here.
The protocol has no nonce: the document is fixed for the enclave's boot, and
freshness comes from the TLS binding, since only the enclave holds the private
key of the attested TLS key and the gateway pins that key on every handshake.

Before a lease is issued, in this order: the route is HTTPS; the release
bundle verifies offline (`sigstore_release`) against the pinned workflow
identity; the document is at most 1 MiB and its report at most 64 KiB once
unzipped; `tdx.verify_quote` vouches for the quote (simulated quotes only
under `allow_simulated`); if the document came over TLS, that TLS key is the
attested one; the TD is not a debug TD and MRCONFIGID, MROWNER, MROWNERCONFIG
are zero; RTMR1 and RTMR2 equal the release's, RTMR3 is zero; MRTD and RTMR0
(the platform's firmware, which the release does not cover) match a set in
`allowed_measurements` naming both. The lease binds `tls-spki:<report_data[:32]>`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.verification import tdx
from gateway.verification.base import (
    Lease,
    Policy,
    VerificationError,
    digest,
    fetch_evidence,
)
from gateway.verification.sigstore_release import Release, ReleaseError, verify_release
from tlog.http1 import spki_sha256
from verifier.tee import quote as tdxquote

TDX_GUEST_V2 = "https://tinfoil.sh/predicate/tdx-guest/v2"
SEV_GUEST_V2 = "https://tinfoil.sh/predicate/sev-snp-guest/v2"
ATTESTATION_PATH = "/.well-known/tinfoil-attestation"
MAX_REPORT = 64 << 10
TD_ATTRIBUTES_DEBUG = 0x01  # TUD.DEBUG, bit 0 of TDATTRIBUTES
HARDWARE_KEYS = frozenset({"mr_td", "rtmr0"})


@dataclass(frozen=True)
class Document:
    """A decoded attestation document: its format URL and the raw report."""

    format: str
    report: bytes


# --- pure format code -----------------------------------------------------

def gunzip(data: bytes, limit: int = MAX_REPORT) -> bytes:
    """The gzip member's content; at most `limit` bytes, no trailing data."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit)
    except zlib.error as e:
        raise VerificationError("evidence_malformed", f"body is not gzip: {e}") from e
    if d.unconsumed_tail:
        raise VerificationError("evidence_malformed", f"report larger than {limit} bytes")
    if not d.eof or d.unused_data:
        raise VerificationError("evidence_malformed", "body is not one complete gzip member")
    return out


def decode_document(raw: bytes) -> Document:
    """Parse `{"format", "body"}`; `evidence_malformed` on any deviation."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise VerificationError("evidence_malformed", f"attestation is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), str) \
            or not isinstance(doc.get("body"), str):
        raise VerificationError("evidence_malformed", "attestation needs string format and body")
    try:
        body = base64.b64decode(doc["body"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise VerificationError("evidence_malformed", f"body is not base64: {e}") from e
    return Document(format=doc["format"], report=gunzip(body))


def split_report_data(report_data: bytes) -> tuple[str, str]:
    """(TLS key fingerprint hex, HPKE public key hex) from the 64 report-data bytes."""
    if len(report_data) != 64:
        raise VerificationError("quote_invalid", "report data is not 64 bytes")
    return report_data[:32].hex(), report_data[32:].hex()


def check_td(report: tdxquote.TdReport) -> None:
    """Tinfoil's TD shape: not debuggable, no host-chosen config identities."""
    if report.td_attributes[0] & TD_ATTRIBUTES_DEBUG:
        raise VerificationError("quote_invalid", "TD is in debug mode")
    for name in ("mr_config_id", "mr_owner", "mr_owner_config"):
        if any(getattr(report, name)):
            raise VerificationError("measurement_mismatch", f"{name} is not zero")


def check_measurements(have: dict[str, str], release: Release, policy: Policy) -> None:
    """RTMR1/2 are the release's, RTMR3 is zero, MRTD/RTMR0 are a pinned platform."""
    for reg in ("rtmr1", "rtmr2"):
        if have[reg] != getattr(release, reg):
            raise VerificationError("measurement_mismatch",
                                    f"{reg} is not the released {reg} of {release.digest[:16]}")
    if have["rtmr3"] != bytes(48).hex():
        raise VerificationError("measurement_mismatch", "rtmr3 is not zero")
    hardware = tuple(m for m in policy.allowed_measurements if m.keys() >= HARDWARE_KEYS)
    if not hardware:
        raise VerificationError("measurement_mismatch",
                                "policy pins no platform (a set with mr_td and rtmr0)")
    if not tdx.measurements_ok(have, dataclasses.replace(policy, allowed_measurements=hardware)):
        raise VerificationError("measurement_mismatch", "mr_td/rtmr0 are no allowed platform")


# --- I/O ------------------------------------------------------------------

def load_release(policy: Policy) -> Release:
    """The released code measurements named by the policy (reads local files only)."""
    if not (policy.sigstore_bundle and policy.sigstore_identity and policy.sigstore_trusted_root):
        raise VerificationError("upstream_unverified", "tinfoil routes need sigstore_bundle, "
                                "sigstore_identity and sigstore_trusted_root in the policy")
    try:
        bundle = Path(policy.sigstore_bundle).read_bytes()
    except OSError as e:
        raise VerificationError("upstream_unverified", f"release bundle unreadable: {e}") from e
    try:
        return verify_release(bundle, policy.sigstore_trusted_root, policy.sigstore_identity,
                              policy.sigstore_issuer)
    except ReleaseError as e:
        raise VerificationError("measurement_mismatch", f"release bundle refused: {e}") from e


def _peer_spki(response: httpx.Response) -> bytes | None:
    """SHA-256 of the SPKI of the TLS peer that served `response`, if it was TLS."""
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return spki_sha256(der) if der else None


async def fetch(client: httpx.AsyncClient, url: str) -> tuple[bytes, bytes | None]:
    """(document bytes, SPKI SHA-256 of the TLS peer or None); at most 1 MiB."""
    return await fetch_evidence(client, url, inspect=_peer_spki)


async def verify(client: httpx.AsyncClient, route: Any, policy: Policy, now: float) -> Lease:
    """Verify a Tinfoil enclave against its Sigstore release; a Lease or VerificationError."""
    base = urlsplit(route.base_url)
    if base.scheme != "https":
        raise VerificationError("binding_mismatch",
                                "route is not HTTPS: the attested TLS key cannot be pinned")
    release = await asyncio.to_thread(load_release, policy)
    raw, peer_spki = await fetch(client, route.attestation_url
                                 or f"https://{base.netloc}{ATTESTATION_PATH}")
    doc = decode_document(raw)
    if doc.format == SEV_GUEST_V2:
        raise VerificationError("unsupported_evidence", "SEV-SNP reports are not verified here")
    if doc.format != TDX_GUEST_V2:
        raise VerificationError("evidence_malformed", f"unknown attestation format {doc.format!r}")
    vq = await tdx.verify_quote(doc.report, policy, now)
    tls_fp, hpke = split_report_data(vq.report_data)
    if peer_spki is not None and not tdx.same(peer_spki, bytes.fromhex(tls_fp)):
        raise VerificationError("binding_mismatch",
                                "the TLS key serving the attestation is not the attested one")
    check_td(vq.quote.report)
    have = vq.measurements()
    check_measurements(have, release, policy)
    return Lease(route_id=route.id, provider=route.provider,
                 evidence="tinfoil" + ("-simulated" if vq.simulated else ""),
                 evidence_digest=digest(raw), binding=f"tls-spki:{tls_fp}",
                 verified_at=now, expires_at=now + policy.max_lease_age,
                 document_b64=base64.b64encode(raw).decode(),
                 facts={"hpke_public_key": hpke, "measurements": have,
                        "release_digest": release.digest, "release_subject": release.subject_name,
                        "simulated": vq.simulated, "tcb_status": vq.tcb_status})
