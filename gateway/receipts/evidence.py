"""Logging each lease's evidence (`pag-evidence/1`, verifier/evidence_entry.py) before the
lease serves a single call.

`EvidenceLog.publish(route, lease)` is the lease store's publish hook: it builds the entry
(the evidence document exactly as the provider served it, the nonce the gateway sent, the
route, binding, validity window, a reference to the collateral that vouched for a real
quote, and the facts the gateway concluded), appends the document's parts first when it is
too large for one entry, then the entry itself, each proof checked (`LogClient`: log
signature, witness quorum, inclusion). It returns the lease with the entry's index and
without the document, or raises `LogError`; the lease store then refuses the lease
(`log_unavailable`): a receipt never names an evidence entry that is not logged, because
the receipt is signed only after the lease it records was returned, and the lease is
returned only once its entry is proven in the log.

Leases are reused for minutes, so the append is paid by the first call after each
verification, not by every call.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.receipts.logclient import LogClient
from verifier import evidence_entry

FACTS = ("app_id", "compose_hash", "mr_td", "tcb_status", "simulated", "signing_address",
         "keyset_hash", "release_digest", "gpu")


def rfc3339(t: float) -> str:
    """Epoch seconds as RFC 3339 UTC (whole seconds), as receipts give lease times."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def collateral_reference(policy: dict[str, Any], simulated: bool) -> dict[str, str] | None:
    """What vouched for a real quote (from the route's `[routes.policy]`): the collateral
    file's SHA-256, or the PCCS used."""
    if simulated:
        return None
    if policy.get("collateral_file"):
        try:
            data = Path(policy["collateral_file"]).read_bytes()
        except OSError:
            return {"source": "file"}
        return {"source": "file", "sha256": hashlib.sha256(data).hexdigest()}
    if policy.get("pccs_url"):
        return {"source": "pccs", "url": str(policy["pccs_url"])}
    return None


def _facts(lease: Any) -> dict[str, Any]:
    """The lease's facts that are plain JSON (what the gateway concluded), by name."""
    out = {}
    for k in FACTS:
        v = lease.facts.get(k)
        if v is None:
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


class EvidenceLog:
    """The publish hook of the lease store (see module docstring)."""

    def __init__(self, client: LogClient, now: Callable[[], str]) -> None:
        self.client = client
        self.now = now

    async def publish(self, route: Any, lease: Any) -> Any:
        """`lease` (a `gateway.verification.base.Lease`) with the log index of its evidence
        entry and without its document, once proven in the log; LogError otherwise."""
        obj, parts = evidence_entry.build(
            route={"route_id": route.id, "model": route.model, "provider": route.provider,
                   "upstream_model": route.upstream_model},
            kind=route.evidence, evidence=lease.evidence, binding=lease.binding,
            lease_id=lease.lease_id, verified_at=rfc3339(lease.verified_at),
            expires_at=rfc3339(lease.expires_at), nonce=lease.nonce,
            document=base64.b64decode(lease.document_b64),
            collateral=collateral_reference(getattr(route, "policy", {}) or {},
                                            bool(lease.facts.get("simulated"))),
            facts=_facts(lease), time=self.now())
        obj["document_parts"] = [(await self.client.append(evidence_entry.entry(p))).index
                                 for p in parts]
        p = await self.client.append(evidence_entry.entry(obj))
        return dataclasses.replace(lease, document_b64="", evidence_index=p.index)
