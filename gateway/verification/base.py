"""The one interface of upstream verification: policy in, lease out, or a refusal.

A `Lease` is what a successful verification of one route yields: the evidence
digest, the channel binding the gateway must enforce on every connection
(`tls-spki:<hex>`: the peer's TLS key must hash to this), and a validity
window. A request never uses a lease past `expires_at`. It also carries the
evidence document and the nonce it answered, so the document can be logged
(a `pag-evidence/1` entry) before the lease serves; once logged the lease
keeps only the entry's index.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import httpx

MAX_EVIDENCE = 1 << 20
SIGNATURE_BINDING = "signing-address:"  # a lease bound only to a response-signing key


class VerificationError(Exception):
    """A route's provider is not verified; `code` is stable, `reason` says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


CODES = ("upstream_unverified", "evidence_missing", "evidence_malformed", "quote_invalid",
         "measurement_mismatch", "binding_mismatch", "evidence_expired", "simulated_not_allowed",
         "unsupported_evidence", "gpu_unverified", "model_mismatch", "log_unavailable")


@dataclass(frozen=True)
class Policy:
    """What a route requires of its provider (`[routes.policy]`)."""

    allow_simulated: bool = False
    allow_unverified: bool = False
    max_lease_age: float = 300.0
    refresh_before: float = 60.0
    allowed_measurements: tuple[dict[str, str], ...] = ()
    allowed_tcb_status: tuple[str, ...] = ("UpToDate",)
    collateral_file: str | None = None
    pccs_url: str | None = None
    collateral_cache_dir: str | None = None
    app_id: str | None = None
    compose_hash: str | None = None
    require_gpu: bool = False
    allow_gpu_unverified_offline: bool = False
    signing_address: str | None = None
    sigstore_bundle: str | None = None
    sigstore_identity: str | None = None
    sigstore_issuer: str = "https://token.actions.githubusercontent.com"
    sigstore_trusted_root: str | None = None
    allow_signature_binding: bool = False
    key_provider_id: str | None = None
    allow_any_workload: bool = False

    def pinned_workload(self) -> tuple[str, ...]:
        """The policy keys that pin which workload may serve (`WORKLOAD_PINS` that are set).
        Without any, every genuine TEE workload passes: config load refuses such a route
        unless `allow_any_workload` says that is intended."""
        return tuple(k for k in WORKLOAD_PINS if getattr(self, k))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        kinds = {f.name: str(f.type) for f in fields(cls)}
        for key, value in d.items():
            if not _type_ok(kinds[key], value):
                raise ValueError(f"policy key {key!r}: wrong type {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):  # a lease age of nan
                raise ValueError(f"policy key {key!r}: must be a finite number")  # never ends
        for m in d.get("allowed_measurements", ()):
            if not isinstance(m, dict) or not all(isinstance(v, str) for v in m.values()):
                raise ValueError("allowed_measurements: a list of tables of hex strings")
            if not m or not all(v.strip() for v in m.values()):
                raise ValueError("allowed_measurements: an empty measurement set (or value) "
                                 "would match every quote")
        if d.get("max_lease_age", 1) <= 0:
            raise ValueError("max_lease_age must be positive")
        kw = dict(d)
        if "allowed_measurements" in kw:
            kw["allowed_measurements"] = tuple(dict(m) for m in kw["allowed_measurements"])
        if "allowed_tcb_status" in kw:
            kw["allowed_tcb_status"] = tuple(kw["allowed_tcb_status"])
        return cls(**kw)


WORKLOAD_PINS = ("allowed_measurements", "app_id", "compose_hash", "signing_address",
                 "sigstore_identity")
PATH_KEYS = ("collateral_file", "collateral_cache_dir", "sigstore_bundle", "sigstore_trusted_root")


def _type_ok(kind: str, value: Any) -> bool:
    """Whether a TOML value fits a Policy field's annotation (bools are not numbers)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind.startswith("str"):
        return isinstance(value, str)
    if kind.startswith("tuple"):
        return isinstance(value, list | tuple)
    return True


@dataclass(frozen=True)
class Lease:
    """A verified route: valid in [verified_at, expires_at) (epoch seconds)."""

    route_id: str
    provider: str
    evidence: str
    evidence_digest: str
    binding: str
    verified_at: float
    expires_at: float
    verified: bool = True
    facts: dict[str, Any] = field(default_factory=dict)
    lease_id: str = field(default_factory=lambda: "lease-" + secrets.token_hex(8))
    nonce: str = ""  # the fresh nonce sent with the evidence request ("" if the kind has none)
    document_b64: str = ""  # the evidence bytes as served (base64), until logged
    evidence_index: int | None = None  # log index of its pag-evidence/1 entry, once logged

    @property
    def tls_spki_sha256(self) -> str | None:
        kind, _, value = self.binding.partition(":")
        return value if kind == "tls-spki" else None

    def valid_at(self, now: float) -> bool:
        return self.verified_at <= now < self.expires_at


def digest(data: bytes) -> str:
    """Lower-case hex SHA-256 of evidence bytes."""
    return hashlib.sha256(data).hexdigest()


async def fetch_evidence(client: httpx.AsyncClient, url: str, params: dict[str, str] | None = None,
                         inspect: Callable[[httpx.Response], Any] | None = None
                         ) -> tuple[bytes, Any]:
    """GET a provider's evidence: (body, `inspect(response)` or None).

    Not 200 or unreachable: `evidence_missing`; more than MAX_EVIDENCE bytes:
    `evidence_malformed` (read no further). `inspect` sees the live response
    (e.g. the TLS peer) before the body is read.
    """
    try:
        async with client.stream("GET", url, params=params, timeout=10) as r:
            if r.status_code != 200:
                raise VerificationError("evidence_missing",
                                        f"attestation endpoint answered {r.status_code}")
            seen = inspect(r) if inspect is not None else None
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > MAX_EVIDENCE:
                    raise VerificationError("evidence_malformed", "attestation larger than 1 MiB")
    except httpx.HTTPError as e:
        raise VerificationError("evidence_missing",
                                f"attestation fetch failed: {type(e).__name__}") from e
    return bytes(body), seen
