"""Leases per route: verified once, reused until shortly before they expire.

`ensure` never returns a lease that is not valid at `now`; one verification
per route runs at a time; a lease inside its refresh window is returned while
a background verification replaces it. A failed verification is remembered
(for the route view) and raised to the caller: the request fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.verification.base import Lease, Policy, VerificationError
from gateway.verification.registry import verify_route


@dataclass
class RouteStatus:
    """The last outcome for a route (what GET /v1/routes shows)."""

    lease: Lease | None = None
    last_error: str | None = None
    checked_at: float | None = None


class LeaseStore:
    """In-process lease cache in front of the evidence adapters."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self.status: dict[str, RouteStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refresh: dict[str, asyncio.Task[None]] = {}
        self._policies: dict[str, Policy] = {}

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(verify=False)  # noqa: S501 - trust comes from the quote
        return self._client

    def get_valid(self, route_id: str, now: float) -> Lease | None:
        st = self.status.get(route_id)
        return st.lease if st and st.lease and st.lease.valid_at(now) else None

    async def ensure(self, route: Any, now: float | None = None) -> Lease:
        """A lease valid at `now` for the route, verifying if needed."""
        now = time.time() if now is None else now
        lease = self.get_valid(route.id, now)
        if lease is not None:
            self._maybe_refresh(route, lease, now)
            return lease
        lock = self._locks.setdefault(route.id, asyncio.Lock())
        async with lock:
            lease = self.get_valid(route.id, now)
            if lease is not None:
                return lease
            return await self._verify(route, now)

    async def invalidate(self, route_id: str) -> None:
        """Drop a route's lease (its key no longer matches): the next use re-verifies."""
        st = self.status.get(route_id)
        if st is not None:
            st.lease = None

    async def _verify(self, route: Any, now: float) -> Lease:
        st = self.status.setdefault(route.id, RouteStatus())
        st.checked_at = now
        try:
            lease = await verify_route(self._http(), route, now)
        except VerificationError as e:
            st.lease, st.last_error = None, f"{e.code}: {e.reason}"
            raise
        st.lease, st.last_error = lease, None
        return lease

    def _maybe_refresh(self, route: Any, lease: Lease, now: float) -> None:
        policy = self._policies.get(route.id)
        if policy is None:
            policy = self._policies[route.id] = Policy.from_dict(getattr(route, "policy", {}) or {})
        if lease.expires_at - now > policy.refresh_before:
            return
        task = self._refresh.get(route.id)
        if task is not None and not task.done():
            return

        async def refresh() -> None:
            lock = self._locks.setdefault(route.id, asyncio.Lock())
            async with lock:
                with contextlib.suppress(VerificationError):
                    await self._verify(route, time.time())

        self._refresh[route.id] = asyncio.create_task(refresh())

    async def close(self) -> None:
        for t in self._refresh.values():
            t.cancel()
        if self._client is not None:
            await self._client.aclose()
