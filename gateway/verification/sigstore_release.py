"""Code measurements from a Sigstore-signed Tinfoil release, verified offline.

A Tinfoil release publishes a Sigstore bundle whose DSSE envelope carries an
in-toto statement (payload type `application/vnd.in-toto+json`) with
predicate type `https://tinfoil.sh/predicate/snp-tdx-multiplatform/v1`:

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "tinfoil-deployment.json", "digest": {"sha256": <hex>}}],
     "predicateType": ".../snp-tdx-multiplatform/v1",
     "predicate": {"snp_measurement": <hex48>,
                   "tdx_measurement": {"rtmr1": <hex48>, "rtmr2": <hex48>}, ...}}

`verify_release` accepts the bundle only if sigstore verifies it against a
trusted root read from a file (no TUF refresh, no network): Fulcio chain,
SCT, Rekor inclusion proof and signed checkpoint, DSSE signature; and the
signing certificate's SAN equals the pinned workflow identity and its OIDC
issuer (the v2 extension, 1.3.6.1.4.1.57264.1.8) equals the pinned issuer.
Only then is the statement parsed, strictly. Every failure raises
`ReleaseError`; nothing here reads the clock or the network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPES = ("https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1")
MULTIPLATFORM_V1 = "https://tinfoil.sh/predicate/snp-tdx-multiplatform/v1"
_STATEMENT_KEYS = frozenset({"_type", "subject", "predicateType", "predicate"})
_REGISTER = re.compile(r"[0-9a-f]{96}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ReleaseError(ValueError):
    """The release bundle does not verify or does not carry the expected statement."""


@dataclass(frozen=True)
class Release:
    """The code measurements a verified release promises (lower-case hex)."""

    predicate_type: str
    subject_name: str
    digest: str
    snp_measurement: str
    rtmr1: str
    rtmr2: str


def parse_statement(payload_type: str, payload: bytes) -> Release:
    """The measurements of a (verified) in-toto statement; strict, pure."""
    if payload_type != PAYLOAD_TYPE:
        raise ReleaseError(f"DSSE payload type {payload_type!r}, want {PAYLOAD_TYPE!r}")
    try:
        st = json.loads(payload)
    except ValueError as e:
        raise ReleaseError(f"statement is not JSON: {e}") from e
    if not isinstance(st, dict) or set(st) != _STATEMENT_KEYS:
        raise ReleaseError("statement must have exactly _type, subject, predicateType, predicate")
    if st["_type"] not in STATEMENT_TYPES:
        raise ReleaseError(f"statement type {st['_type']!r} not allowed")
    if st["predicateType"] != MULTIPLATFORM_V1:
        raise ReleaseError(f"predicate type {st['predicateType']!r}, want {MULTIPLATFORM_V1!r}")
    subject = st["subject"]
    if not isinstance(subject, list) or len(subject) != 1 or not isinstance(subject[0], dict):
        raise ReleaseError("statement must name exactly one subject")
    digest = subject[0].get("digest")
    sha = digest.get("sha256") if isinstance(digest, dict) else None
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
        raise ReleaseError("subject has no sha256 digest")
    pred = st["predicate"]
    tdx = pred.get("tdx_measurement") if isinstance(pred, dict) else None
    if not isinstance(tdx, dict):
        raise ReleaseError("predicate has no tdx_measurement")
    regs = {"snp_measurement": pred.get("snp_measurement"),
            "rtmr1": tdx.get("rtmr1"), "rtmr2": tdx.get("rtmr2")}
    for name, value in regs.items():
        if not isinstance(value, str) or not _REGISTER.fullmatch(value.lower()):
            raise ReleaseError(f"{name} is not 48 bytes of hex")
    return Release(predicate_type=MULTIPLATFORM_V1, subject_name=str(subject[0].get("name", "")),
                   digest=sha.lower(), **{k: v.lower() for k, v in regs.items()})


def verify_release(bundle_json: bytes, trusted_root_path: str, identity: str,
                   issuer: str) -> Release:
    """Verify a Sigstore bundle offline against the pinned signer; its measurements."""
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier
    from sigstore.verify.policy import AllOf, Identity, OIDCIssuerV2

    try:
        root = TrustedRoot.from_file(trusted_root_path)
        verifier = Verifier(trusted_root=root)
    except Exception as e:  # noqa: BLE001 - any failure of the parser is a refusal
        raise ReleaseError(f"trusted root {Path(trusted_root_path).name}: {e}") from e
    try:
        bundle = Bundle.from_json(bundle_json)
        policy = AllOf([Identity(identity=identity), OIDCIssuerV2(issuer)])
        payload_type, payload = verifier.verify_dsse(bundle, policy)
    except Exception as e:  # noqa: BLE001 - any failure to verify is a refusal
        raise ReleaseError(f"sigstore: {type(e).__name__}: {e}") from e
    return parse_statement(payload_type, payload)
