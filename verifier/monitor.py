"""Tail a log, accept each receipt through `receipt_check`, alert on policy violations.

Each poll audits the log from the saved state (so a checkpoint inconsistent
with an earlier one is caught as a split view) and classifies every new
entry, in log order:

- a keyset entry (`pag-keyset/1`) is checked under the policy's keyset pins
  (`receipt_check.trusted_keyset`), and the checkpoint its attestation nonce
  names must be of the tree being audited (a consistency proof from the log's
  tiles, `log_reader.EntryReader.extends`): in policy and of this tree it
  becomes a trusted keyset for the receipts after it; out of policy it is the
  alert `keyset_out_of_policy`, bound to a checkpoint of another tree (a fork
  signed by the log) `keyset_checkpoint_fork`;
- a receipt (`pag-receipt/...`) is accepted only by `receipt_check.accept`
  with the trusted keysets logged *before* it. A receipt that does not parse
  or whose signature fails is `bad_receipt`; one whose key has no logged,
  in-policy keyset entry before it is `unattested_receipt`. Accepted
  receipts, and only they, are checked against the route policy
  (`forbidden_route|provider|model`, `unverified_upstream`, `e2ee_mode`,
  `unknown_signing_key`), except refusals: a receipt that forwarded nothing
  (`forwarded_hash` and both provider digests null: the call never reached a
  provider) breaks no route rule and is counted as a refusal;
- evidence entries and anything else are counted.

Invariant: no entry, however malformed (not JSON, not an object, huge
numbers, NaN, wrong types, deep nesting), stops the monitor. The worst an
entry does is one alert (`entry_unreadable` if a check itself fails), and the
state always advances past it. Entry classes are counted apart
(`pag_monitor_entries_total{kind=...}`: receipt, refusal,
receipt_unattested, receipt_invalid, keyset, keyset_out_of_policy, evidence,
other); label values from the log are escaped in /metrics. Alerts are JSON
lines on stdout; `--webhook URL` also POSTs each one, from a bounded queue in
a background thread (verifier/webhook.py), so a slow webhook never holds up a
poll. The dashboard (`/api/state`, `/metrics`) serves what `publish` built on
the poll's side at the end of each poll: a consistent picture, and counts only
of entries in a tree the audit verified. The trusted keysets are
saved beside `--state` (`STATE.keysets.json`) so a restart keeps them; start
a new state when the keyset pins change.

Policy file (JSON object; every key optional):

    {"allow_simulated": false, "app_id": HEX, "compose_hash": HEX,
     "measurements": [{"mr_td": HEX, "rtmr0": HEX, ...}, ...],
     "collateral": "FILE" | null, "pccs_url": URL | null,
     "gateway_keys": ["<base64 receipt_signing_key>", ...],   # empty: any attested key
     "allowed_routes": [...], "allowed_providers": [...], "allowed_models": [...],
     "require_verified": true, "require_e2ee": "aci-1" | null}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tlog import checkpoint, note
from verifier import audit as auditing
from verifier import evidence_entry, keyset_entry, log_reader, receipt_check
from verifier.webhook import WebhookQueue
from witness import cosignature

ENTRY_KINDS = ("receipt", "refusal", "receipt_unattested", "receipt_invalid", "keyset",
               "keyset_out_of_policy", "evidence", "other")
ALERTS_KEPT = 1000  # alerts held in memory: the first and the latest (counts stay exact)
UNATTESTED_CODES = ("keyset_not_before", "keyset_unavailable", "keyset_entry_invalid",
                    "receipt_key_mismatch", "receipt_mismatch")


def _strings(obj: dict[str, Any], key: str) -> list[str] | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"policy {key} must be a list of strings or null")
    return v


@dataclass
class Policy:
    """What the log's keyset entries and receipts are allowed to say."""

    gateway_keys: list[str] = field(default_factory=list)
    allowed_routes: list[str] | None = None
    allowed_providers: list[str] | None = None
    allowed_models: list[str] | None = None
    require_verified: bool = True
    require_e2ee: str | None = None
    allow_simulated: bool = False
    app_id: str | None = None
    compose_hash: str | None = None
    measurements: list[dict[str, str]] = field(default_factory=list)
    collateral: str | None = None
    pccs_url: str | None = None

    @classmethod
    def load(cls, path: Path) -> Policy:
        """The policy in a JSON file; ValueError (one line) if it is not one."""
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError("policy must be a JSON object")
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        for k in ("allowed_routes", "allowed_providers", "allowed_models"):
            _strings(obj, k)
        if not isinstance(_strings(obj, "gateway_keys") or [], list):
            raise ValueError("policy gateway_keys must be a list")
        for k in ("require_verified", "allow_simulated"):
            if k in obj and not isinstance(obj[k], bool):
                raise ValueError(f"policy {k} must be true or false")
        for k in ("require_e2ee", "app_id", "compose_hash", "collateral", "pccs_url"):
            if obj.get(k) is not None and not isinstance(obj[k], str):
                raise ValueError(f"policy {k} must be a string or null")
        ms = obj.get("measurements", [])
        if not isinstance(ms, list) or not all(
                isinstance(m, dict) and m and all(isinstance(v, str) for v in m.values())
                for m in ms):
            raise ValueError("policy measurements must be a list of non-empty objects of hex")
        return cls(**{**obj, "gateway_keys": obj.get("gateway_keys") or []})

    def keyset_policy(self) -> receipt_check.KeysetPolicy:
        """The keyset pins, as `receipt_check` takes them."""
        col = None
        if self.collateral is not None:
            col = Path(self.collateral).read_text()
        return receipt_check.KeysetPolicy(
            allow_simulated=self.allow_simulated, app_id=self.app_id,
            compose_hash=self.compose_hash, measurements=tuple(self.measurements),
            collateral=col, pccs_url=self.pccs_url)


def is_refusal(r: dict[str, Any]) -> bool:
    """A receipt of a call that never reached a provider: every digest of bytes sent to or
    received from one is null (a receipt that nulls `forwarded_hash` but shows provider
    bytes contradicts itself and is checked as a forwarded call)."""
    return all(r.get(k) is None for k in ("forwarded_hash", "provider_request_hash",
                                          "provider_response_hash"))


def route_alerts(r: dict[str, Any], policy: Policy) -> list[tuple[str, str]]:
    """(alert kind, reason) for every way an accepted receipt breaks the route policy."""
    out: list[tuple[str, str]] = []
    sig_key = r["signature"].get("key")
    if policy.gateway_keys and sig_key not in policy.gateway_keys:
        out.append(("unknown_signing_key", "receipt signed by a key the policy does not list"))
    if is_refusal(r):
        return out  # nothing reached a provider, no route rule can be broken
    route = r["route"]
    for kind, value, allowed in (("forbidden_route", route.get("route_id"),
                                  policy.allowed_routes),
                                 ("forbidden_provider", route.get("provider"),
                                  policy.allowed_providers),
                                 ("forbidden_model", route.get("model"), policy.allowed_models)):
        if allowed is not None and value not in allowed:
            out.append((kind, f"{kind.split('_')[1]} {_short(value)} is not allowed"))
    if policy.require_verified and r["upstream"].get("verified") is not True:
        out.append(("unverified_upstream", "upstream was not verified"))
    mode = r["e2ee"].get("mode")
    if policy.require_e2ee and mode != policy.require_e2ee:
        out.append(("e2ee_mode", f"e2ee mode {_short(mode)}, policy requires "
                                 f"{policy.require_e2ee!r}"))
    return out


def _short(value: Any) -> str:
    """A value from the log, safe and short for an alert reason."""
    return repr(value)[:80]


def escape_label(value: str) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _parse(entry: bytes) -> Any:
    try:
        return json.loads(entry)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


class Monitor:
    """One log under watch."""

    def __init__(self, log_url: str, log_verifier: note.Ed25519Verifier, policy: Policy, *,
                 witnesses: list[cosignature.CosignatureVerifier], quorum: int,
                 witness_urls: list[str], state_path: Path | None, webhook: str | None,
                 quiet: bool = False) -> None:
        self.log_url = log_url
        self.quiet = quiet  # collect alerts without printing them (`verifier audit --policy`)
        self.verifier = log_verifier
        self.policy = policy
        self.keyset_policy = policy.keyset_policy()
        self.witnesses = witnesses
        self.quorum = quorum
        self.witness_urls = witness_urls
        self.state_path = state_path
        self.webhook = WebhookQueue(webhook) if webhook else None
        self.state = auditing.load_state(state_path)
        self.keysets = self._load_keysets()
        self.alerts: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.entries: dict[str, int] = dict.fromkeys(ENTRY_KINDS, 0)
        self.receipts: dict[str, dict[str, int]] = {"route": {}, "provider": {}, "verified": {}}
        self.history: list[dict[str, Any]] = []
        self._target: checkpoint.Checkpoint | None = None  # the checkpoint being audited
        self._reader: log_reader.EntryReader | None = None  # its tiles, for keyset checks
        self.published: tuple[bytes, str] = (b"", "")
        self.publish()

    def _keysets_path(self) -> Path | None:
        if self.state_path is None:
            return None
        return self.state_path.with_name(self.state_path.name + ".keysets.json")

    def _load_keysets(self) -> dict[int, receipt_check.TrustedKeyset]:
        p = self._keysets_path()
        if p is None or not p.exists() or self.state is None:
            return {}
        try:
            return {int(k): receipt_check.TrustedKeyset(**v)
                    for k, v in json.loads(p.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise auditing.AuditError(f"keyset file {p} is unreadable: {e}") from e

    def _save_keysets(self) -> None:
        p = self._keysets_path()
        if p is None:
            return
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps({str(i): dataclasses.asdict(k)
                                   for i, k in self.keysets.items()}))
        tmp.replace(p)

    def alert(self, kind: str, reason: str, **extra: Any) -> None:
        a = {"alert": kind, "reason": reason, "time": time.time(), **extra}
        self.alerts.append(a)
        if len(self.alerts) >= 2 * ALERTS_KEPT:  # one alert per hostile entry: keep memory
            del self.alerts[1:ALERTS_KEPT + 1]  # bounded, the first and the latest alerts
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if not self.quiet:
            print(json.dumps(a), flush=True)
        if self.webhook is not None:
            self.webhook.put(a)

    def on_entry(self, index: int, entry: bytes) -> None:
        """Classify one new entry; raises only AuditError (the log did not serve the
        tiles a check needs: the poll fails and is retried), see the module docstring."""
        try:
            kind = self._classify(index, entry)
        except auditing.AuditError:
            raise
        except Exception as e:  # noqa: BLE001 - a hostile entry must not stop the monitor
            self.alert("entry_unreadable", f"checking the entry failed: {type(e).__name__}",
                       index=index)
            kind = "other"
        self.entries[kind] += 1

    def _classify(self, index: int, entry: bytes) -> str:
        obj = _parse(entry)
        v = obj.get("v") if isinstance(obj, dict) else None
        if v == keyset_entry.VERSION:
            try:
                ks = receipt_check.trusted_keyset(
                    obj, index, log_verifier=self.verifier, policy=self.keyset_policy)
            except keyset_entry.KeysetEntryError as e:
                self.alert("keyset_out_of_policy", f"keyset entry {index}: {e}", index=index)
                return "keyset_out_of_policy"
            try:
                self._check_of_this_tree(obj["checkpoint"])
            except log_reader.NotAPrefix as e:
                self.alert("keyset_checkpoint_fork", f"keyset entry {index}: {e}", index=index)
                return "keyset_out_of_policy"
            self.keysets[index] = ks
            return "keyset"
        if isinstance(v, str) and v.startswith("pag-receipt/"):
            return self._receipt(index, obj, entry)
        if v in (evidence_entry.VERSION, evidence_entry.PART_VERSION):
            return "evidence"
        return "other"

    def _check_of_this_tree(self, cp_text: str) -> None:
        """NotAPrefix unless the checkpoint a keyset entry names (already checked signed
        by the log, and no bigger than the entry's index) is of a prefix of the tree being
        audited; AuditError if the log does not serve the tiles that would show it."""
        if self._target is None or self._reader is None:
            raise auditing.AuditError("no checkpoint is being audited")
        old, _ = checkpoint.open(cp_text.encode(), self.verifier)
        try:
            self._reader.extends(old, self._target)
        except log_reader.NotAPrefix:
            raise
        except log_reader.LogReadError as e:
            raise auditing.AuditError(f"checking a keyset entry's checkpoint: {e}") from e

    def _receipt(self, index: int, obj: dict[str, Any], entry: bytes) -> str:
        def lookup(ki: int) -> receipt_check.TrustedKeyset:
            ks = self.keysets.get(ki)
            if ks is None:
                raise LookupError("no logged, in-policy keyset entry at that index")
            return ks

        try:
            acc = receipt_check.accept(obj, lookup, receipt_index=index, entry=entry)
        except receipt_check.ReceiptRefused as e:
            if e.code in UNATTESTED_CODES:
                self.alert("unattested_receipt", str(e), index=index)
                return "receipt_unattested"
            self.alert("bad_receipt", str(e), index=index)
            return "receipt_invalid"
        r = acc.receipt
        for kind, reason in route_alerts(r, self.policy):
            self.alert(kind, reason, index=index)
        route, up = r["route"], r["upstream"]
        for key, value in (("route", route.get("route_id")), ("provider", route.get("provider")),
                           ("verified", up.get("verified"))):
            label = json.dumps(value) if not isinstance(value, str) else value
            bucket = self.receipts[key]
            bucket[label] = bucket.get(label, 0) + 1
        return "refusal" if is_refusal(r) else "receipt"

    async def poll(self) -> None:
        """Check what is new since the last poll.

        Entries are classified as the audit reads them, before it has checked them against
        the signed root; if the audit then fails, the counts and trusted keysets go back
        to what they were (the alerts already raised stay raised)."""
        fetcher = auditing.Fetcher(self.log_url)
        saved = (dict(self.entries), {k: dict(v) for k, v in self.receipts.items()},
                 dict(self.keysets))
        client = httpx.Client(timeout=30)
        self._reader = log_reader.EntryReader(log_reader.getter(self.log_url, client))

        def target(cp: checkpoint.Checkpoint) -> None:
            self._target = cp

        try:
            new = await auditing.audit(fetcher, self.verifier, witnesses=self.witnesses,
                                       quorum=self.quorum, state=self.state,
                                       on_entry=self.on_entry, on_checkpoint=target)
        except auditing.AuditError as e:
            self.entries, self.receipts, self.keysets = saved
            kind = "split_view" if ("split view" in str(e) or "consisten" in str(e)
                                    or "shrank" in str(e) or "root mismatch" in str(e)) else "audit"
            self.alert(kind, str(e))
            self.publish()
            return
        finally:
            self._target = self._reader = None
            client.close()
            await fetcher.close()
        self.state = new
        self.history.append({"time": time.time(), "size": new.size,
                             "cosigners": len(new.cosigners),
                             "receipts": sum(self.receipts["route"].values())})
        if self.state_path is not None:
            self._save_keysets()
            auditing.save_state(self.state_path, new)
        await self._compare_witnesses(new)
        self.publish()

    @property
    def alert_total(self) -> int:
        """Every alert raised, including those no longer held in `alerts`."""
        return sum(self.counts.values())

    def publish(self) -> None:
        """Build what the dashboard serves, on the poll's side: the dashboard thread reads
        only `published` (one reference, swapped whole), never the dicts a poll mutates."""
        self.published = (json.dumps(self.snapshot()).encode(), self.metrics())

    def snapshot(self) -> dict[str, Any]:
        """What the dashboard shows (call from the poll's thread; others read `published`)."""
        s = self.state
        return {"log": self.log_url, "origin": s.origin if s else None,
                "size": s.size if s else 0, "root": s.root.hex() if s else None,
                "cosigners": list(s.cosigners) if s else [], "receipts": self.receipts,
                "entries": self.entries, "keysets": len(self.keysets),
                "history": self.history[-500:], "alerts": self.alerts[-200:],
                "alert_counts": self.counts}

    def metrics(self) -> str:
        """Prometheus text exposition (label values from the log escaped)."""
        lines = ["# TYPE pag_monitor_alerts_total counter"]
        lines += [f'pag_monitor_alerts_total{{kind="{escape_label(k)}"}} {v}'
                  for k, v in sorted(self.counts.items())]
        lines += ["# TYPE pag_monitor_log_size gauge",
                  f"pag_monitor_log_size {self.state.size if self.state else 0}",
                  "# TYPE pag_monitor_entries_total counter"]
        lines += [f'pag_monitor_entries_total{{kind="{k}"}} {v}'
                  for k, v in self.entries.items()]
        lines += ["# TYPE pag_monitor_receipts_total counter"]
        lines += [f'pag_monitor_receipts_total{{route="{escape_label(k)}"}} {v}'
                  for k, v in sorted(self.receipts["route"].items())]
        if self.webhook is not None:
            lines += ["# TYPE pag_monitor_webhook_dropped_total counter",
                      f"pag_monitor_webhook_dropped_total {self.webhook.dropped}",
                      "# TYPE pag_monitor_webhook_failed_total counter",
                      f"pag_monitor_webhook_failed_total {self.webhook.failed}"]
        return "\n".join(lines) + "\n"

    async def _compare_witnesses(self, state: auditing.State) -> None:
        """A witness that cosigned another root for the same size shows a split view.

        Whatever a witness page says (or the network does) is at most one alert per
        witness: a malformed page is `witness_unreachable`, never a stop."""
        async with httpx.AsyncClient(timeout=10) as c:
            for url in self.witness_urls:
                try:
                    status = json.loads(await _read_capped(c, url.rstrip("/") + "/"))
                    logs = [log for log in status.get("logs", []) if log.get("origin") ==
                            state.origin and log.get("root") is not None]
                    for log in logs:
                        size, root = log["size"], bytes.fromhex(log["root"])
                        if not isinstance(size, int):
                            raise TypeError("size is not an integer")
                        if size == state.size and root != state.root:
                            self.alert("split_view", f"witness {url} cosigned another root at "
                                                     f"size {state.size}", witness=url)
                        if size > state.size:
                            await self._check_ahead(size, root, url)
                except (httpx.HTTPError, ValueError, TypeError, AttributeError, KeyError,
                        RecursionError) as e:
                    self.alert("witness_unreachable", f"{url}: {type(e).__name__}")

    async def _check_ahead(self, size: int, root: bytes, url: str) -> None:
        """The witness saw a bigger tree: the log must prove it extends ours."""
        fetcher = auditing.Fetcher(self.log_url)  # an http(s) log or a directory
        try:
            cp, _ = checkpoint.open(await fetcher.get("checkpoint"), self.verifier)
        except auditing.AuditError as e:
            self.alert("audit", str(e))
            return
        except checkpoint.CheckpointError:
            return
        finally:
            await fetcher.close()
        if cp.size == size and cp.root_hash != root:
            self.alert("split_view", f"witness {url} and the log disagree at size {cp.size}",
                       witness=url)


WITNESS_PAGE_MAX = 1 << 20  # bytes of a witness status page read at most


async def _read_capped(c: httpx.AsyncClient, url: str) -> bytes:
    """The body at `url`; ValueError past WITNESS_PAGE_MAX (a hostile page may not end)."""
    async with c.stream("GET", url) as r:
        body = bytearray()
        async for chunk in r.aiter_bytes():
            body += chunk
            if len(body) > WITNESS_PAGE_MAX:
                raise ValueError("witness status page too large")
    return bytes(body)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", required=True, help="log base URL or directory")
    p.add_argument("--policy", type=Path, required=True, help="route policy (JSON)")
    p.add_argument("--state", type=Path)
    p.add_argument("--witness-url", action="append", default=[],
                   help="witness whose GET / lists the sizes and roots it cosigned")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    p.add_argument("--once", action="store_true", help="poll once; exit 1 if anything alerted")
    p.add_argument("--webhook")
    p.add_argument("--listen", help="HOST:PORT for the dashboard (/), /api/state and /metrics")


def run(args: argparse.Namespace) -> int:
    from verifier.cli import Failure, _key_text, printable

    try:
        policy = Policy.load(args.policy)
        log_verifier = note.verifier_from_vkey(_key_text(args.vkey))
        ws = [cosignature.verifier_from_vkey(_key_text(v)) for v in args.witness]
        quorum = len(ws) if args.quorum is None else args.quorum
        if not 0 <= quorum <= len(ws):
            raise ValueError(f"--quorum {quorum} with {len(ws)} witness keys")
        if not args.once and not (math.isfinite(args.interval) and args.interval > 0):
            raise ValueError(f"--interval {args.interval}: not a positive, finite number of "
                             "seconds")  # asyncio.sleep(nan) returns at once: a spinning poll
        m = Monitor(args.log, log_verifier, policy, witnesses=ws, quorum=quorum,
                    witness_urls=args.witness_url, state_path=args.state, webhook=args.webhook)
    except (ValueError, OSError, TypeError, auditing.AuditError, Failure) as e:
        print(printable(f"verifier: monitor set-up: {e}"), file=sys.stderr)
        return 2

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
        if m.webhook is not None:
            m.webhook.drain()  # a --once run exits only once its alerts were posted
    if m.alerts:
        print(printable(f"verifier: {m.alert_total} alert(s): {m.alerts[0]['alert']}: "
                        f"{m.alerts[0]['reason']}"), file=sys.stderr)
        return 1
    return 0
