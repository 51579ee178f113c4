"""Evidence kinds the gateway can verify, by the name a route's `evidence` gives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from gateway.verification import dstack
from gateway.verification.base import Lease, Policy, VerificationError

Adapter = Callable[[httpx.AsyncClient, Any, Policy, float], Awaitable[Lease]]

ADAPTERS: dict[str, Adapter] = {"dstack": dstack.verify}


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
    adapter = ADAPTERS.get(route.evidence)
    if adapter is None:
        raise VerificationError("unsupported_evidence", f"no verifier for {route.evidence!r}")
    return await adapter(client, route, policy, now)
