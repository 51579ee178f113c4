"""The one place that decides whether a receipt is accepted.

A `pag-receipt/2` receipt is accepted (`accept`) only if, in this order:

1. its shape and Ed25519 signature verify (`receipt.verify`), and the log
   entry it came from, when given, is exactly its RFC 8785 bytes;
2. the keyset entry it names (`keyset_index`) comes before it in the log, when
   the receipt's own log index is known;
3. that entry is a trusted keyset (`lookup(keyset_index)`): for a logged
   `pag-keyset/1` entry, `trusted_keyset` checks it under a `KeysetPolicy`
   (its checkpoint signed by the log; its attestation bound to that
   checkpoint's nonce, simulated only if allowed, a real quote through
   dcap-qvl; the pinned app id, compose hash and measurement sets; the
   attested keyset names the log the entry was read from);
4. the key that signed the receipt is that keyset's `receipt_signing_key`,
   and the receipt's `gateway` (app id, compose hash, keyset hash) is that
   keyset's;
5. every digest the caller recomputed (`digests`: member -> D(bytes) under
   the caller's salt) equals the receipt's.

Nothing else accepts a receipt: the CLI (`proof`, `receipt`), the monitor and
the client SDK all call `accept`, with a `lookup` that reads the keyset entry
from the log (CLI), from the entries seen so far (monitor) or from the lease
the client attested (SDK). Refusals are `ReceiptRefused` with a stable code:
receipt_invalid, keyset_not_before, keyset_unavailable, keyset_entry_invalid,
receipt_key_mismatch, receipt_mismatch, digest_mismatch.
"""

from __future__ import annotations

import base64
import datetime
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tlog import note
from verifier import keyset_entry, receipt
from verifier.tee import dcap


class ReceiptRefused(Exception):
    """A receipt that is not accepted. `code` is stable; `message` says why in one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TrustedKeyset:
    """A keyset whose attestation was accepted, and where the log holds it (None: unknown)."""

    receipt_signing_key: str  # base64, as in the keyset
    keyset_hash: str
    app_id: str
    compose_hash: str
    simulated: bool
    index: int | None = None
    tcb_status: str | None = None


@dataclass(frozen=True)
class Accepted:
    """What `accept` proved about one receipt."""

    receipt: dict[str, Any]
    keyset: TrustedKeyset
    digests_checked: tuple[str, ...]

    @property
    def digests_unchecked(self) -> tuple[str, ...]:
        """Digest members present in the receipt that nobody recomputed."""
        return tuple(k for k in receipt.DIGEST_FIELDS
                     if self.receipt.get(k) is not None and k not in self.digests_checked)


@dataclass(frozen=True)
class KeysetPolicy:
    """What a logged keyset entry's attestation must show.

    `measurements`: allowed sets of `mr_td`, `rtmr0`..`rtmr3` (any one matches; none
    given pins nothing). Real quotes need `collateral` (QuoteCollateralV3 JSON text)
    or `pccs_url`; they are checked with dcap-qvl at the entry's own `time` and must
    be `UpToDate`."""

    allow_simulated: bool = False
    app_id: str | None = None
    compose_hash: str | None = None
    measurements: tuple[Mapping[str, str], ...] = ()
    collateral: str | None = None
    pccs_url: str | None = None
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def pins(self) -> list[str]:
        """The workload pins this policy sets, by name (for the output)."""
        return [name for name, v in (("app_id", self.app_id), ("compose_hash",
                                     self.compose_hash), ("measurement", self.measurements))
                if v]

    def quote_verifier(self, at: float) -> Callable[[bytes], dcap.DcapResult] | None:
        """dcap-qvl at time `at` with this policy's collateral, or None without any."""
        if self.collateral is None and self.pccs_url is None:
            return None

        def verify(raw: bytes) -> dcap.DcapResult:
            if self.collateral is not None:
                if "col" not in self._loaded:
                    self._loaded["col"] = dcap.load_collateral(self.collateral)
                col = self._loaded["col"]
            else:
                col = dcap.load_collateral(_run(dcap.fetch_collateral(str(self.pccs_url), raw)))
            result = dcap.verify(raw, col, at)
            if result.tcb_status != "UpToDate":
                raise dcap.DcapError("quote_invalid", f"TCB status {result.tcb_status}")
            return result

        return verify


def _run(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even inside a running event loop
    (the monitor checks entries from within its audit coroutine)."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _epoch(text: Any) -> float:
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError as e:
        raise keyset_entry.KeysetEntryError("malformed", "time is not RFC 3339") from e


def trusted_keyset(obj: Any, index: int, *, log_verifier: note.Verifier,
                   policy: KeysetPolicy) -> TrustedKeyset:
    """A parsed log entry, checked as a `pag-keyset/1` entry under `policy`
    (`keyset_entry.check`) whose attested keyset names this log's key (`log_vkey`);
    KeysetEntryError otherwise."""
    if not keyset_entry.is_keyset_entry(obj):
        raise keyset_entry.KeysetEntryError("malformed", "not a pag-keyset/1 entry")
    facts = keyset_entry.check(obj, log_verifier=log_verifier,
                               allow_simulated=policy.allow_simulated, app_id=policy.app_id,
                               compose_hash=policy.compose_hash,
                               measurements=tuple(policy.measurements),
                               verify_quote=policy.quote_verifier(_epoch(obj.get("time"))))
    if facts.keyset.get("log_vkey") != getattr(log_verifier, "vkey", None):
        raise keyset_entry.KeysetEntryError("log_key_mismatch", "the attested keyset names "
                                            "another log than the one read")
    qv = facts.attestation.quote_verification
    return TrustedKeyset(facts.receipt_signing_key, facts.keyset_hash, facts.app_id,
                         facts.compose_hash, facts.simulated, index,
                         getattr(qv, "tcb_status", None))


Lookup = Callable[[int], TrustedKeyset]


def accept(rec: Any, lookup: Lookup, *, receipt_index: int | None = None,
           digests: Mapping[str, str] | None = None, entry: bytes | None = None) -> Accepted:
    """Accept `rec` or raise ReceiptRefused (see the module docstring for the rules).

    `lookup(keyset_index)` returns the trusted keyset at that index or raises
    ReceiptRefused, `keyset_entry.KeysetEntryError` or `LookupError`. `entry`, the log
    entry `rec` was parsed from, must be its RFC 8785 bytes (no duplicate members or
    other spellings that two parsers could read differently)."""
    try:
        signer = receipt.verify(rec)
        if entry is not None and receipt.entry(rec) != entry:
            raise receipt.ReceiptError("the log entry is not the receipt's RFC 8785 bytes")
    except receipt.ReceiptError as e:
        raise ReceiptRefused("receipt_invalid", str(e)) from None
    ki = rec["keyset_index"]
    if receipt_index is not None and not ki < receipt_index:
        raise ReceiptRefused("keyset_not_before", f"the receipt at {receipt_index} names "
                             f"keyset entry {ki}, which does not precede it")
    try:
        ks = lookup(ki)
    except keyset_entry.KeysetEntryError as e:
        raise ReceiptRefused("keyset_entry_invalid", f"keyset entry {ki}: {e}") from None
    except LookupError as e:
        raise ReceiptRefused("keyset_unavailable", f"keyset entry {ki}: {e}") from None
    if not hmac.compare_digest(base64.b64encode(signer).decode(), ks.receipt_signing_key):
        raise ReceiptRefused("receipt_key_mismatch", "the receipt is signed by a key other "
                             f"than the receipt key of keyset entry {ki}")
    gw = rec["gateway"]
    if (gw.get("app_id"), gw.get("compose_hash"), gw.get("keyset_hash")) != (
            ks.app_id, ks.compose_hash, ks.keyset_hash):
        raise ReceiptRefused("receipt_mismatch", "the receipt names another gateway identity "
                             "than its attested keyset")
    checked = []
    for member, want in (digests or {}).items():
        have = rec.get(member) if member in receipt.DIGEST_FIELDS else None
        if not isinstance(have, str) or not hmac.compare_digest(have, want):
            raise ReceiptRefused("digest_mismatch", f"{member} does not match the bytes "
                                 "given (or the salt is wrong)")
        checked.append(member)
    return Accepted(rec, ks, tuple(checked))
