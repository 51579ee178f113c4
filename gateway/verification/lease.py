"""Leases per route: verified once, reused until shortly before they expire.

`ensure` never returns a lease that is not valid at `now`; one verification
per route runs at a time (across replicas too, with a `SharedLeases` Redis
cache); a lease inside its refresh window is returned while a background
verification replaces it. A failed verification is remembered (for the route
view) and raised to the caller: the request fails closed. `invalidate` drops
a lease whose key the provider no longer presents, so the next use
re-verifies.

With a `publish` hook (the gateway's evidence log), a freshly verified lease is
handed to it before anything else sees the lease: it logs the lease's evidence
(a `pag-evidence/1` entry) and returns the lease with the entry's index. Only
then is the lease stored, shared with other replicas, or returned; if logging
fails, the verification fails (`log_unavailable`) and nothing is sent upstream.
A lease adopted from another replica was published by that replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.verification.base import Lease, Policy, VerificationError
from gateway.verification.registry import verify_route
from gateway.verification.shared import SharedLeases

SHARED_WAIT = 15.0
Publish = Callable[[Any, Lease], Awaitable[Lease]]


@dataclass
class RouteStatus:
    """The last outcome for a route (what GET /v1/routes shows)."""

    lease: Lease | None = None
    last_error: str | None = None
    checked_at: float | None = None


class LeaseStore:
    """In-process lease cache in front of the evidence adapters."""

    def __init__(self, client: httpx.AsyncClient | None = None,
                 shared: SharedLeases | None = None, publish: Publish | None = None) -> None:
        self._client = client
        self._shared = shared
        self._publish = publish
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
            if self._shared is None:
                return await self._verify(route, now)
            return await self._verify_shared(route, now)

    async def _verify_shared(self, route: Any, now: float) -> Lease:
        """Adopt another replica's lease, or verify under the shared lock and publish."""
        shared = self._shared
        assert shared is not None  # noqa: S101 - type narrowing: checked by the caller
        lease = await shared.get(route, now)
        if lease is None:
            token = await shared.lock(route)
            if token is None:
                lease = await shared.wait(route, now, SHARED_WAIT)
                token = None if lease is not None else await shared.lock(route)
            if lease is None:
                try:
                    lease = await self._verify(route, now)
                    await shared.put(route, lease, now)
                finally:
                    if token is not None:
                        await shared.unlock(route, token)
                return lease
        st = self.status.setdefault(route.id, RouteStatus())
        st.lease, st.last_error, st.checked_at = lease, None, now
        return lease

    async def invalidate(self, route: Any, lease_id: str) -> None:
        """Drop the route's lease if it is still `lease_id` (the provider's key no longer
        matches it): the next `ensure` re-verifies. A newer lease is kept."""
        st = self.status.get(route.id)
        if st is not None and st.lease is not None and st.lease.lease_id == lease_id:
            st.lease = None
        if self._shared is not None:
            await self._shared.drop(route, lease_id)

    async def _verify(self, route: Any, now: float) -> Lease:
        st = self.status.setdefault(route.id, RouteStatus())
        st.checked_at = now
        try:
            lease = await verify_route(self._http(), route, now)
            if self._publish is not None and lease.document_b64:
                lease = await self._publish(route, lease)
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
                    t = time.time()
                    lease = await self._verify(route, t)
                    if self._shared is not None:
                        await self._shared.put(route, lease, t)

        self._refresh[route.id] = asyncio.create_task(refresh())

    async def close(self) -> None:
        for t in self._refresh.values():
            t.cancel()
        if self._client is not None:
            await self._client.aclose()
        if self._shared is not None:
            await self._shared.close()
