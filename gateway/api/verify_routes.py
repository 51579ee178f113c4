"""`python -m gateway verify-routes --config FILE`: re-verify every route at once.

Prints one row per route (route, provider, evidence, the policy keys pinning
the workload, or `ANY WORKLOAD` when the route says `allow_any_workload`,
result, reason, lease expiry) and exits 1 if any route marked `required`
fails, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import httpx

from gateway.api import config as gconfig
from gateway.api.routes import workload_pins
from gateway.upstream.leases import rfc3339
from gateway.verification.base import VerificationError
from gateway.verification.registry import verify_route


async def verify_all(cfg: gconfig.Config, now: float) -> list[dict[str, Any]]:
    """Verify every configured route concurrently."""
    async with httpx.AsyncClient(verify=False) as client:  # noqa: S501 - trust comes from the quote

        async def one(route: gconfig.RouteSpec) -> dict[str, Any]:
            pins = workload_pins(route)
            row = {"route": route.id, "provider": route.provider, "evidence": route.evidence,
                   "required": route.required,
                   "pins": "ANY WORKLOAD" if pins["allow_any_workload"] and not pins["pins"]
                   else ",".join(pins["pins"]) or "-",
                   "allow_any_workload": pins["allow_any_workload"]}
            try:
                lease = await verify_route(client, route, now)
            except VerificationError as e:
                return {**row, "result": "FAIL", "code": e.code, "reason": e.reason,
                        "expires": None}
            notes = " ".join(f"{k}={lease.facts[k]}" for k in ("gpu", "tcb_status")
                             if lease.facts.get(k))
            return {**row, "result": "ok" if lease.verified else "unverified",
                    "code": None, "reason": f"{lease.binding} {notes}".strip(),
                    "expires": rfc3339(lease.expires_at)}

        return await asyncio.gather(*[one(r) for r in cfg.routes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway verify-routes")
    ap.add_argument("--config", required=True)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = gconfig.load(args.config)
    except (gconfig.ConfigError, OSError) as e:
        print(f"verify-routes: {e}", file=sys.stderr)
        return 2
    rows = asyncio.run(verify_all(cfg, time.time()))
    if args.json:
        print(json.dumps(rows))
    else:
        cols = ("route", "provider", "evidence", "pins", "result", "reason", "expires")
        widths = {c: max(len(c), *(len(str(r[c] if c != "reason" else
                                        (f"{r['code']}: {r['reason']}" if r["code"] else r["reason"])))
                                   for r in rows)) for c in cols} if rows else {c: len(c) for c in cols}
        print("  ".join(c.upper().ljust(widths[c]) for c in cols))
        for r in rows:
            reason = f"{r['code']}: {r['reason']}" if r["code"] else r["reason"]
            vals = {**r, "reason": reason}
            print("  ".join(str(vals[c] if vals[c] is not None else "-").ljust(widths[c]) for c in cols))
    failed = [r for r in rows if r["result"] == "FAIL" and r["required"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
