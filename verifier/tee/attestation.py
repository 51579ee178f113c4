"""The `GET /.well-known/attestation` document and its `check` (pure; the gateway builds it
in gateway/identity/attestation.py).

Report data rule (64 bytes, the TDX quote's `report_data`):

    report_data[0:32]  = bytes.fromhex(keyset_hash)
    report_data[32:64] = SHA-256(nonce.encode("utf-8"))   if a nonce was given
                         32 zero bytes                     otherwise

where `keyset_hash` is the lower-case hex SHA-256 of the RFC 8785 bytes of the
`keyset` object, and `nonce` is the `?nonce=` string exactly as the client
sent it (the empty string is a nonce; no parameter is no nonce).

Document members: `v`, `quote` (hex), `event_log` (dstack's JSON string, as
returned by `GetQuote`), `simulated`, `app_id`, `compose_hash`,
`instance_id`, `key_provider`, `keyset`, `keyset_hash`, `report_data` (hex),
`vm_config`, and `nonce` when one was given.

`check` trusts nothing in the document but the quote, and the quote only
after a caller-supplied `verify_quote` accepted it (or, if `allow_simulated`,
when it is a simulated quote): it recomputes `keyset_hash` from `keyset`,
matches it and the nonce against the quote's report data, replays RTMR3 from
the event-log payloads, compares it with the quote's RTMR3 and reads the app
id and compose hash from the replayed events. Each failure raises
`AttestationError` with a distinct `code`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from verifier.tee import eventlog, quote
from verifier.tee.keyset import Keyset, KeysetError

DOC_VERSION = "pag-attestation/1"
MAX_NONCE_LEN = 1024


class AttestationError(ValueError):
    """An attestation document failed a check. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AttestationFacts:
    """What a successful `check` established."""

    simulated: bool
    app_id: str
    compose_hash: str
    instance_id: str | None
    key_provider: dict[str, Any] | None
    keyset: dict[str, str]
    keyset_hash: str
    nonce: str | None
    report_data: bytes
    mr_td: str
    rtmrs: tuple[str, str, str, str]
    quote_verification: Any = None


def nonce_digest(nonce: str | None) -> bytes:
    """report_data[32:64] for `nonce` (see module docstring)."""
    return bytes(32) if nonce is None else hashlib.sha256(nonce.encode("utf-8")).digest()


def report_data_for(keyset_hash_hex: str, nonce: str | None) -> bytes:
    """The 64-byte report data binding a keyset hash and an optional nonce."""
    kh = bytes.fromhex(keyset_hash_hex)
    if len(kh) != 32:
        raise ValueError("keyset_hash must be 32 bytes of hex")
    return kh + nonce_digest(nonce)


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _norm_hex(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    v = value.lower().removeprefix("0x")
    try:
        bytes.fromhex(v)
    except ValueError as e:
        raise ValueError(f"{what} is not hex") from e
    return v


def check(doc: Mapping[str, Any], *, nonce: str | None = None, allow_simulated: bool = False,
          expected_app_id: str | None = None, expected_compose_hash: str | None = None,
          verify_quote: Callable[[bytes], Any] | None = None) -> AttestationFacts:
    """Verify an attestation document; return its facts or raise `AttestationError`.

    `verify_quote(quote_bytes)` must raise unless the quote's signature chain
    verifies (e.g. with dcap-qvl); its return value is kept in the facts. A
    non-simulated quote without `verify_quote` is refused
    (`quote_unverified`); a simulated quote is refused unless `allow_simulated`
    (`simulated_not_allowed`). `nonce`, when given, must be the one bound.

    Codes: malformed, quote_invalid, simulated_not_allowed, quote_unverified,
    quote_verification_failed, keyset_invalid, keyset_hash_mismatch,
    report_data_mismatch, keyset_not_bound, nonce_mismatch, event_log_invalid,
    rtmr3_mismatch, identity_missing, identity_mismatch, app_id_mismatch,
    compose_hash_mismatch.
    """
    if not isinstance(doc, Mapping):
        raise AttestationError("malformed", "attestation document must be a JSON object")
    for member in ("quote", "event_log", "keyset", "keyset_hash"):
        if member not in doc:
            raise AttestationError("malformed", f"missing member {member!r}")
    if not isinstance(doc["quote"], str):
        raise AttestationError("malformed", "quote must be a hex string")
    try:
        raw = bytes.fromhex(doc["quote"])
        parsed = quote.parse_quote(raw)
    except ValueError as e:
        raise AttestationError("quote_invalid", f"cannot parse quote: {e}") from e

    # 1. Who vouches for the quote.
    simulated = quote.is_simulated(raw)
    verification: Any = None
    if simulated:
        if not allow_simulated:
            raise AttestationError("simulated_not_allowed",
                                   "quote is simulated and policy does not allow simulated quotes")
    elif quote.looks_simulated(raw):
        raise AttestationError("quote_invalid", "quote carries a partial simulated marker")
    elif verify_quote is None:
        raise AttestationError("quote_unverified",
                               "non-simulated quote needs a verify_quote callable (dcap-qvl)")
    else:
        try:
            verification = verify_quote(raw)
        except Exception as e:
            raise AttestationError("quote_verification_failed",
                                   f"quote verification failed: {e}") from e
    if doc.get("simulated", simulated) is not simulated:
        raise AttestationError("malformed", "document's 'simulated' contradicts the quote")

    # 2. The keyset and its hash.
    try:
        ks = Keyset.from_json(doc["keyset"])
    except KeysetError as e:
        raise AttestationError("keyset_invalid", str(e)) from e
    kh = ks.keyset_hash()
    if doc["keyset_hash"] != kh:
        raise AttestationError("keyset_hash_mismatch",
                               "keyset_hash is not SHA-256 of the RFC 8785 keyset")

    # 3. Report data binds the keyset hash and the nonce.
    rd = parsed.report.report_data
    if "report_data" in doc and doc["report_data"] != rd.hex():
        raise AttestationError("report_data_mismatch",
                               "document report_data differs from the quote's")
    if not _eq(rd[:32], bytes.fromhex(kh)):
        raise AttestationError("keyset_not_bound",
                               "quote report_data[0:32] does not commit to this keyset")
    doc_nonce = doc.get("nonce")
    if doc_nonce is not None and not isinstance(doc_nonce, str):
        raise AttestationError("malformed", "nonce must be a string")
    if nonce is not None and not _eq(rd[32:], nonce_digest(nonce)):
        raise AttestationError("nonce_mismatch", "quote is not bound to the expected nonce")
    try:
        doc_digest = nonce_digest(doc_nonce)
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 bytes, no digest
        raise AttestationError("malformed", "nonce is not UTF-8 text") from None
    if not _eq(rd[32:], doc_digest):
        raise AttestationError("nonce_mismatch",
                               "quote report_data[32:64] does not match the document's nonce")

    # 4. RTMR3 replay and identity from the events.
    try:
        rep = eventlog.replay(doc["event_log"])
    except eventlog.EventLogError as e:
        raise AttestationError("event_log_invalid", str(e)) from e
    if not _eq(rep.rtmr3, parsed.report.rtmr3):
        raise AttestationError("rtmr3_mismatch",
                               "RTMR3 replayed from the event log differs from the quote's")
    if rep.app_id is None or rep.compose_hash is None:
        raise AttestationError("identity_missing",
                               "event log lacks an app-id or compose-hash event")
    for member, value in (("app_id", rep.app_id), ("compose_hash", rep.compose_hash),
                          ("instance_id", rep.instance_id)):
        claimed = doc.get(member)
        if claimed is not None and str(claimed).lower() != value:
            raise AttestationError("identity_mismatch",
                                   f"document {member} differs from the replayed event log")
    try:
        exp_app = _norm_hex(expected_app_id, "expected_app_id")
        exp_compose = _norm_hex(expected_compose_hash, "expected_compose_hash")
    except ValueError as e:
        raise AttestationError("malformed", str(e)) from e
    if exp_app is not None and rep.app_id != exp_app:
        raise AttestationError("app_id_mismatch",
                               f"app id {rep.app_id} is not the expected {exp_app}")
    if exp_compose is not None and rep.compose_hash != exp_compose:
        raise AttestationError("compose_hash_mismatch",
                               f"compose hash {rep.compose_hash} is not the expected {exp_compose}")

    r = parsed.report
    return AttestationFacts(
        simulated=simulated, app_id=rep.app_id, compose_hash=rep.compose_hash,
        instance_id=rep.instance_id, key_provider=rep.key_provider, keyset=ks.to_json(),
        keyset_hash=kh, nonce=doc_nonce, report_data=rd, mr_td=r.mr_td.hex(),
        rtmrs=(r.rtmr0.hex(), r.rtmr1.hex(), r.rtmr2.hex(), r.rtmr3.hex()),
        quote_verification=verification)
