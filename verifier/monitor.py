"""Tail a log, check each receipt against a route policy, alert on violations.

Each poll audits the log from the saved state (so a checkpoint inconsistent
with an earlier one is caught as a split view), checks every new receipt
entry (signature, shape, signing key, route, provider, model, upstream
verification, E2EE mode), and compares the log's checkpoint with the latest
one each configured witness reports for the same size. Alerts are JSON lines
on stdout; `--webhook URL` also POSTs each one.

Policy file (JSON):

    {"gateway_keys": ["<base64 receipt_signing_key>", ...],   # empty: any key
     "allowed_routes": [...], "allowed_providers": [...], "allowed_models": [...],
     "require_verified": true, "require_e2ee": "aci-1" | null}
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tlog import checkpoint, note
from verifier import audit as auditing
from verifier import receipt
from witness import cosignature


@dataclass
class Policy:
    """What receipts in the log are allowed to say."""

    gateway_keys: list[str] = field(default_factory=list)
    allowed_routes: list[str] | None = None
    allowed_providers: list[str] | None = None
    allowed_models: list[str] | None = None
    require_verified: bool = True
    require_e2ee: str | None = None

    @classmethod
    def load(cls, path: Path) -> Policy:
        obj = json.loads(path.read_text())
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        return cls(**obj)


def check_receipt(entry: bytes, policy: Policy) -> list[tuple[str, str]]:
    """(alert kind, reason) for every way a receipt entry breaks the policy."""
    try:
        r = json.loads(entry)
    except (ValueError, UnicodeDecodeError):
        return []  # not a receipt: logs may hold other entries
    if not isinstance(r, dict) or r.get("v") != receipt.VERSION:
        return []
    try:
        key = receipt.verify(r)
    except receipt.ReceiptError as e:
        return [("bad_receipt", str(e))]
    out: list[tuple[str, str]] = []
    if policy.gateway_keys and base64.b64encode(key).decode() not in policy.gateway_keys:
        out.append(("unknown_signing_key", "receipt signed by a key no attested gateway holds"))
    route = r["route"]
    for kind, value, allowed in (("forbidden_route", route.get("route_id"), policy.allowed_routes),
                                 ("forbidden_provider", route.get("provider"), policy.allowed_providers),
                                 ("forbidden_model", route.get("model"), policy.allowed_models)):
        if allowed is not None and value not in allowed:
            out.append((kind, f"{kind.split('_')[1]} {value!r} is not allowed"))
    if policy.require_verified and r["upstream"].get("verified") is not True:
        out.append(("unverified_upstream", "upstream was not verified"))
    if policy.require_e2ee and r["e2ee"].get("mode") != policy.require_e2ee:
        out.append(("e2ee_mode", f"e2ee mode {r['e2ee'].get('mode')!r}, policy requires "
                                 f"{policy.require_e2ee!r}"))
    return out


class Monitor:
    """One log under watch."""

    def __init__(self, log_url: str, log_verifier: note.Ed25519Verifier, policy: Policy, *,
                 witnesses: list[cosignature.CosignatureVerifier], quorum: int,
                 witness_urls: list[str], state_path: Path | None, webhook: str | None) -> None:
        self.log_url = log_url
        self.verifier = log_verifier
        self.policy = policy
        self.witnesses = witnesses
        self.quorum = quorum
        self.witness_urls = witness_urls
        self.state_path = state_path
        self.webhook = webhook
        self.state = auditing.load_state(state_path)
        self.alerts: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.receipts: dict[str, dict[str, int]] = {"route": {}, "provider": {}, "verified": {}}
        self.history: list[dict[str, Any]] = []

    def alert(self, kind: str, reason: str, **extra: Any) -> None:
        a = {"alert": kind, "reason": reason, "time": time.time(), **extra}
        self.alerts.append(a)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        print(json.dumps(a), flush=True)
        if self.webhook:
            try:
                httpx.post(self.webhook, json=a, timeout=5)
            except httpx.HTTPError as e:
                print(f"monitor: webhook failed: {type(e).__name__}", file=sys.stderr)

    async def poll(self) -> None:
        """Check what is new since the last poll."""
        def on_entry(index: int, entry: bytes) -> None:
            self._count(entry)
            for kind, reason in check_receipt(entry, self.policy):
                self.alert(kind, reason, index=index)

        fetcher = auditing.Fetcher(self.log_url)
        try:
            new = await auditing.audit(fetcher, self.verifier, witnesses=self.witnesses,
                                       quorum=self.quorum, state=self.state, on_entry=on_entry)
        except auditing.AuditError as e:
            kind = "split_view" if ("split view" in str(e) or "consisten" in str(e)
                                    or "shrank" in str(e) or "root mismatch" in str(e)) else "audit"
            self.alert(kind, str(e))
            return
        finally:
            await fetcher.close()
        self.state = new
        self.history.append({"time": time.time(), "size": new.size,
                             "cosigners": len(new.cosigners),
                             "receipts": sum(self.receipts["route"].values())})
        if self.state_path is not None:
            auditing.save_state(self.state_path, new)
        await self._compare_witnesses(new)

    def _count(self, entry: bytes) -> None:
        try:
            r = json.loads(entry)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(r, dict) or r.get("v") != receipt.VERSION:
            return
        route, up = r.get("route") or {}, r.get("upstream") or {}
        for key, value in (("route", route.get("route_id")), ("provider", route.get("provider")),
                           ("verified", str(up.get("verified")).lower())):
            bucket = self.receipts[key]
            bucket[str(value)] = bucket.get(str(value), 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """What the dashboard shows."""
        s = self.state
        return {"log": self.log_url, "origin": s.origin if s else None,
                "size": s.size if s else 0, "root": s.root.hex() if s else None,
                "cosigners": list(s.cosigners) if s else [], "receipts": self.receipts,
                "history": self.history[-500:], "alerts": self.alerts[-200:],
                "alert_counts": self.counts}

    def metrics(self) -> str:
        """Prometheus text exposition."""
        lines = ["# TYPE pag_monitor_alerts_total counter"]
        lines += [f'pag_monitor_alerts_total{{kind="{k}"}} {v}' for k, v in sorted(self.counts.items())]
        lines += ["# TYPE pag_monitor_log_size gauge",
                  f"pag_monitor_log_size {self.state.size if self.state else 0}",
                  "# TYPE pag_monitor_receipts_total counter"]
        lines += [f'pag_monitor_receipts_total{{route="{k}"}} {v}'
                  for k, v in sorted(self.receipts["route"].items())]
        return "\n".join(lines) + "\n"

    async def _compare_witnesses(self, state: auditing.State) -> None:
        """A witness that cosigned another root for the same size shows a split view."""
        async with httpx.AsyncClient(timeout=10) as c:
            for url in self.witness_urls:
                try:
                    status = (await c.get(url.rstrip("/") + "/")).json()
                except (httpx.HTTPError, ValueError) as e:
                    self.alert("witness_unreachable", f"{url}: {type(e).__name__}")
                    continue
                for log in status.get("logs", []):
                    if log.get("origin") != state.origin or log.get("root") is None:
                        continue
                    if log["size"] == state.size and bytes.fromhex(log["root"]) != state.root:
                        self.alert("split_view", f"witness {url} cosigned another root at size "
                                                 f"{state.size}", witness=url)
                    if log["size"] > state.size:
                        await self._check_ahead(c, log, state, url)

    async def _check_ahead(self, c: httpx.AsyncClient, wlog: dict, state: auditing.State,
                           url: str) -> None:
        """The witness saw a bigger tree: the log must prove it extends ours."""
        r = await c.get(f"{self.log_url.rstrip('/')}/checkpoint")
        try:
            cp, _ = checkpoint.open(r.content, self.verifier)
        except checkpoint.CheckpointError:
            return
        if cp.size == wlog["size"] and cp.root_hash.hex() != wlog["root"]:
            self.alert("split_view", f"witness {url} and the log disagree at size {cp.size}",
                       witness=url)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", required=True, help="log base URL or directory")
    p.add_argument("--policy", type=Path, required=True, help="route policy (JSON)")
    p.add_argument("--state", type=Path)
    p.add_argument("--witness-url", action="append", default=[],
                   help="witness whose GET / lists the sizes and roots it cosigned")
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--once", action="store_true", help="poll once; exit 1 if anything alerted")
    p.add_argument("--webhook")
    p.add_argument("--listen", help="HOST:PORT for the dashboard (/), /api/state and /metrics")


def run(args: argparse.Namespace) -> int:
    from verifier.cli import _key_text

    try:
        policy = Policy.load(args.policy)
        log_verifier = note.verifier_from_vkey(_key_text(args.vkey))
        ws = [cosignature.verifier_from_vkey(_key_text(v)) for v in args.witness]
    except (ValueError, OSError, TypeError) as e:
        print(f"verifier: monitor set-up: {e}", file=sys.stderr)
        return 2
    quorum = len(ws) if args.quorum is None else args.quorum
    m = Monitor(args.log, log_verifier, policy, witnesses=ws, quorum=quorum,
                witness_urls=args.witness_url, state_path=args.state, webhook=args.webhook)

    if args.listen:
        from verifier.dashboard import serve_dashboard

        host, _, port = args.listen.rpartition(":")
        serve_dashboard(m, host or "127.0.0.1", int(port))

    async def loop() -> None:
        while True:
            await m.poll()
            if args.once:
                return
            await asyncio.sleep(args.interval)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(loop())
    if m.alerts:
        print(f"verifier: {len(m.alerts)} alert(s): {m.alerts[0]['alert']}: {m.alerts[0]['reason']}",
              file=sys.stderr)
        return 1
    return 0
