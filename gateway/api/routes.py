"""Each route's last verification outcome, kept as leases are acquired (for GET /v1/routes).

`RouteBook.acquire` is the one place the pipeline asks for a lease: it returns
facts only for a lease that satisfies the route's policy (else the refusal
propagates, and nothing is sent upstream) and records the outcome either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.api.config import RouteSpec
from gateway.api.errors import GatewayError
from gateway.upstream.leases import LeaseFacts, Leases
from gateway.verification.base import Policy

_second: list[Any] = [-1, ""]


def now_rfc3339(t: float | None = None) -> str:
    """UTC time `t` (default now) as RFC 3339 with milliseconds; the date part is cached."""
    t = time.time() if t is None else t
    sec = int(t)
    if sec != _second[0]:
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{int((t - sec) * 1000):03d}Z"


@dataclass
class RouteState:
    """Last verification outcome of one route."""

    state: str = "unknown"
    lease_id: str | None = None
    verified_at: str | None = None
    expires_at: str | None = None
    last_error: str | None = None
    checked_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def workload_pins(route: RouteSpec) -> dict[str, Any]:
    """`pins`: the policy keys pinning which workload may serve the route, and
    `allow_any_workload`: whether the route accepts any genuine TEE workload."""
    policy = Policy.from_dict(route.policy)
    return {"pins": list(policy.pinned_workload()),
            "allow_any_workload": policy.allow_any_workload}


class RouteBook:
    """Leases per route, with each route's last outcome."""

    def __init__(self, routes: tuple[RouteSpec, ...], leases: Leases) -> None:
        self.routes = routes
        self.leases = leases
        self.state = {r.id: RouteState() for r in routes}

    async def acquire(self, route: RouteSpec) -> LeaseFacts:
        """A lease satisfying the route's policy, or the GatewayError refusing it."""
        st = self.state[route.id]
        st.checked_at = now = time.time()
        try:
            facts = await self.leases.acquire(route, now)
        except GatewayError as e:
            st.state, st.last_error = "refused", f"{e.code}: {e.message}"
            raise
        st.state = "verified" if facts.verified else "unverified-allowed"
        st.lease_id, st.verified_at, st.expires_at = (facts.lease_id, facts.verified_at,
                                                      facts.expires_at)
        st.notes = facts.notes
        return facts

    def view(self, route: RouteSpec) -> dict[str, Any]:
        """One route as GET /v1/routes shows it."""
        st = self.state[route.id]
        return {"id": route.id, "model": route.model, "aliases": list(route.aliases),
                "provider": route.provider, "evidence": route.evidence, "kind": route.kind,
                "priority": route.priority, **workload_pins(route),
                "state": st.state, "lease_id": st.lease_id,
                "verified_at": st.verified_at, "lease_expires_at": st.expires_at,
                "last_error": st.last_error, "facts": st.notes,
                "checked_at": now_rfc3339(st.checked_at) if st.checked_at else None}
