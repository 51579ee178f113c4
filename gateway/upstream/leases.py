"""The lease adapter: the one place that knows the verification API.

It turns the verification engine's `Lease` into `LeaseFacts` (what a receipt
records, plus the TLS pin the connection must enforce) and its refusals into
GatewayErrors with the stable code.

Invariants:
- `Leases.acquire` returns facts only for a lease that satisfies the route's
  policy; otherwise it raises a GatewayError with the stable code, and the
  caller sends nothing upstream.
- A lease that binds a TLS key on a route that is not HTTPS is refused.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.api.config import RouteSpec
from gateway.api.errors import refused


def rfc3339(t: float | datetime | str | None) -> str | None:
    """RFC 3339 UTC text for a timestamp given as epoch seconds, datetime or text."""
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, datetime):
        dt = t if t.tzinfo else t.replace(tzinfo=UTC)
    else:
        dt = datetime.fromtimestamp(t, UTC)
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LeaseFacts:
    """What the receipt's `upstream` member records, plus the channel pin to enforce."""

    verified: bool
    evidence: str
    binding: str
    lease_id: str
    verified_at: str | None
    expires_at: str | None
    pin: tuple[str, bytes] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # for the route view, not receipts
    e2ee_key: bytes | None = None  # the provider's attested E2EE (X25519) key, if any
    evidence_index: int | None = None  # log index of the lease's pag-evidence/1 entry

    def receipt(self) -> dict[str, Any]:
        """The receipt's `upstream` member."""
        out: dict[str, Any] = {"verified": self.verified, "evidence": self.evidence,
                               "binding": self.binding, "lease_id": self.lease_id}
        if self.verified_at is not None:
            out["verified_at"] = self.verified_at
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        if self.evidence_index is not None:
            out["evidence_index"] = self.evidence_index
        return out


class LeaseSource(Protocol):
    """What the gateway needs from a lease store: `ensure(route, now) -> Lease`."""

    async def ensure(self, route: RouteSpec, now: float) -> Any: ...

    async def invalidate(self, route: RouteSpec, lease_id: str) -> None: ...


ROUTE_NOTES = ("gpu", "tcb_status", "simulated", "app_id", "compose_hash", "signing_address")
PIN_KINDS = {"tls-spki": "spki", "tls_spki_sha256": "spki", "tls-cert": "cert"}


def pin_of(binding: str) -> tuple[str, bytes] | None:
    """The TLS pin a binding demands: ("spki" | "cert", SHA-256), or None.

    `tls-spki:<hex>` pins the SHA-256 of the peer's SubjectPublicKeyInfo,
    `tls-cert:<hex>` the SHA-256 of its DER certificate. Any other binding
    pins nothing on the connection.
    """
    kind, sep, value = binding.partition(":")
    if not sep or kind not in PIN_KINDS:
        return None
    digest = bytes.fromhex(value)
    if len(digest) != 32:
        raise ValueError("a TLS pin is a 32-byte SHA-256")
    return PIN_KINDS[kind], digest


def facts_of(lease: Any) -> LeaseFacts:
    """Translate the verification engine's Lease into receipt facts."""
    binding = str(getattr(lease, "binding", None) or "none")
    return LeaseFacts(
        verified=bool(getattr(lease, "verified", False)),
        evidence=str(getattr(lease, "evidence", "none")),
        binding=binding,
        lease_id=str(getattr(lease, "lease_id", None) or getattr(lease, "id", "")),
        verified_at=rfc3339(getattr(lease, "verified_at", None)),
        expires_at=rfc3339(getattr(lease, "expires_at", None)),
        pin=pin_of(binding),
        evidence_index=_index(getattr(lease, "evidence_index", None)),
        notes={k: v for k, v in (getattr(lease, "facts", None) or {}).items() if k in ROUTE_NOTES},
        e2ee_key=e2ee_key_of(getattr(lease, "facts", None) or {}))


def e2ee_key_of(facts: dict[str, Any]) -> bytes | None:
    """The provider's attested E2EE key from the lease facts (base64 of 32 bytes), or None;
    ValueError if malformed."""
    value = facts.get("e2ee_public_key")
    if value is None:
        return None
    raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    if len(raw) != 32:
        raise ValueError("the attested E2EE key is not 32 bytes")
    return raw


def _index(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Leases:
    """Adapter over the verification engine's LeaseStore."""

    def __init__(self, store: LeaseSource, error_type: type[Exception]) -> None:
        self._store = store
        self._error_type = error_type
        self._facts: dict[str, tuple[Any, LeaseFacts]] = {}

    async def acquire(self, route: RouteSpec, now: float) -> LeaseFacts:
        """A lease satisfying the route's policy, or a refusal naming the route."""
        try:
            lease = await self._store.ensure(route, now)
        except self._error_type as e:
            code = str(getattr(e, "code", "upstream_unverified"))
            reason = str(getattr(e, "reason", e))
            status = 503 if code == "log_unavailable" else 502  # evidence could not be logged
            raise refused(status, code, f"route {route.id!r} refused: {code}: {reason}",
                          route_id=route.id) from e
        cached = self._facts.get(route.id)
        if cached is not None and cached[0] is lease:
            return cached[1]
        try:
            facts = facts_of(lease)
        except ValueError as e:
            raise refused(502, "binding_mismatch", f"route {route.id!r} refused: "
                          f"binding_mismatch: malformed binding: {e}", route_id=route.id) from e
        if facts.pin is not None and not route.base_url.startswith("https://"):
            raise refused(502, "binding_mismatch",
                          f"route {route.id!r} refused: binding_mismatch: lease binds a TLS "
                          "key but the route is not HTTPS", route_id=route.id)
        self._facts[route.id] = (lease, facts)
        return facts

    async def invalidate(self, route: RouteSpec, facts: LeaseFacts) -> None:
        """Forget a lease whose key the provider no longer presents (next acquire re-verifies)."""
        cached = self._facts.get(route.id)
        if cached is not None and cached[1] is facts:
            del self._facts[route.id]
        await self._store.invalidate(route, facts.lease_id)
