"""Evidence kinds the gateway can verify, by the name a route's `evidence` gives."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from gateway.verification.base import Lease, Policy, VerificationError

Adapter = Callable[[httpx.AsyncClient, Any, Policy, float], Awaitable[Lease]]

log = logging.getLogger("gateway.verification")

# evidence kind -> the adapter, or the module whose `verify` it is (imported on first use)
ADAPTERS: dict[str, str | Adapter] = {
    "dstack": "gateway.verification.dstack",
    "phala": "gateway.verification.phala",
    "nearai": "gateway.verification.nearai",
    "tinfoil": "gateway.verification.tinfoil",
}


def adapter(kind: str) -> Adapter | None:
    """The verify function for an evidence kind, or None if there is none."""
    found = ADAPTERS.get(kind)
    if found is None or callable(found):
        return found
    return importlib.import_module(found).verify


async def verify_route(client: httpx.AsyncClient, route: Any, now: float) -> Lease:
    """Verify one route's provider under its policy; a Lease or VerificationError.

    `evidence = "none"` yields an unverified lease only if the policy says
    `allow_unverified` (off by default).
    """
    try:
        policy = Policy.from_dict(getattr(route, "policy", {}) or {})
    except (TypeError, ValueError) as e:
        raise VerificationError("upstream_unverified", f"bad policy: {e}") from e
    if route.evidence == "none":
        if not policy.allow_unverified:
            raise VerificationError("upstream_unverified",
                                    "route has no evidence and policy requires verification")
        return Lease(route.id, route.provider, "none", "", "none", now, now + policy.max_lease_age,
                     verified=False)
    verify = adapter(route.evidence)
    if verify is None:
        raise VerificationError("unsupported_evidence", f"no verifier for {route.evidence!r}")
    try:
        key = getattr(route, "api_key", "")
        if key:  # the provider wants its credential: only over CA-verified TLS (https only)
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as authed:
                return await verify(authed, route, policy, now)
        return await verify(client, route, policy, now)
    except VerificationError:
        raise
    except Exception as e:  # an adapter bug or evidence it did not foresee: fail closed, no 5xx
        log.exception("route %s: %s verifier failed unexpectedly", route.id, route.evidence)
        raise VerificationError("evidence_malformed",
                                f"{route.evidence} evidence could not be checked "
                                f"({type(e).__name__})") from e
