"""The evidence entry (`pag-evidence/1`): the upstream evidence behind one lease, logged once
before the first receipt that names it (`upstream.evidence_index`), so that a receipt's
"verified: true" can be re-verified by anyone later, not only believed (pure).

    {"v": "pag-evidence/1",
     "route_id": STR, "model": STR, "provider": STR, "upstream_model": STR,
     "kind": "dstack" | "phala" | "nearai" | "tinfoil",   # the route's evidence kind
     "evidence": STR,            # the lease's label, e.g. "dstack-simulated"
     "binding": STR,             # the channel the lease bound, e.g. "tls-spki:<hex>"
     "lease_id": STR, "verified_at": RFC3339, "expires_at": RFC3339,
     "nonce": STR,               # the fresh nonce the gateway sent with its evidence request
                                 # ("" for kinds without one: tinfoil)
     "document_sha256": HEX,     # SHA-256 of the evidence bytes exactly as served
     "document_encoding": "utf-8" | "base64",
     "document": STR | null,     # those bytes (text, or base64), null when in parts
     "document_parts": [INT],    # log indices of the parts, in order ([] when inline)
     "collateral": {...} | null, # what vouched for a real quote: {"source": "file",
                                 # "sha256": HEX} or {"source": "pccs", "url": STR};
                                 # null for simulated quotes
     "facts": {...},             # what the gateway concluded (app id, compose hash, ...)
     "time": RFC3339}

A document too large for one entry (a log entry holds at most 65,535 bytes) is split
into `pag-evidence-part/1` entries, appended before the evidence entry:

    {"v": "pag-evidence-part/1", "document_sha256": HEX, "part": I, "parts": N,
     "data": BASE64}

Rules:
- Each entry is the RFC 8785 canonical bytes of its object.
- `document_sha256` is SHA-256 of the document bytes (inline, or the parts' data joined
  in order); `document` decodes with `document_encoding` to exactly those bytes.
- The entry holds no request or response content: only the provider's attestation, the
  gateway's own random nonce, and the route.
- `recheck` re-verifies a logged document offline for the kinds whose checks are pure
  (`RECHECKABLE`: `dstack`): the quote (simulated only if allowed; a real quote through a
  `verify_quote` callable, e.g. dcap-qvl with collateral valid at `verified_at`), the
  report data binding the provider's keyset and the logged nonce, RTMR3 replayed from the
  event log, and that the lease's binding is the attested TLS key.

`parse` is the one place an evidence entry's shape is accepted; `recheck` the one place a
logged document is re-verified.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785

from verifier.tee import attestation

VERSION = "pag-evidence/1"
PART_VERSION = "pag-evidence-part/1"
MAX_ENTRY = 0xFFFF
PART_BYTES = 40_000  # raw bytes per part: base64 and the JSON around it stay under MAX_ENTRY
RECHECKABLE = ("dstack",)
HEX64 = re.compile(r"[0-9a-f]{64}")
STRINGS = ("route_id", "model", "provider", "upstream_model", "kind", "evidence", "binding",
           "lease_id", "verified_at", "expires_at", "nonce", "document_sha256",
           "document_encoding", "time")
REQUIRED = (*STRINGS, "v", "document", "document_parts", "collateral", "facts")


class EvidenceEntryError(ValueError):
    """A malformed evidence entry, or a document that does not re-verify. `code` is stable:
    malformed, document_mismatch, unsupported_kind, attestation_invalid, binding_mismatch."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EvidenceEntry:
    """A shape-checked evidence entry."""

    obj: dict[str, Any]
    route_id: str
    kind: str
    binding: str
    nonce: str
    document_sha256: str
    document_parts: tuple[int, ...]

    def document(self, parts: Sequence[Mapping[str, Any]] = ()) -> bytes:
        """The document bytes, from the entry or from its parts (in order); checked against
        `document_sha256`."""
        if not self.document_parts:
            return decode_document(self.obj)
        if len(parts) != len(self.document_parts):
            raise EvidenceEntryError("document_mismatch", f"{len(self.document_parts)} parts "
                                     f"named, {len(parts)} given")
        return join_parts(parts, self.document_sha256)


def entry(obj: Mapping[str, Any]) -> bytes:
    """The log entry: RFC 8785 bytes of the object."""
    return rfc8785.dumps(dict(obj))


def _encoded(document: bytes) -> tuple[str, str]:
    try:
        return "utf-8", document.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(document).decode()


def build(*, route: Mapping[str, str], kind: str, evidence: str, binding: str, lease_id: str,
          verified_at: str, expires_at: str, nonce: str, document: bytes,
          collateral: Mapping[str, str] | None, facts: Mapping[str, Any], time: str
          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the evidence entry object, the part objects to append first, in order).

    With parts, the entry's `document_parts` is empty and `document` null: the caller
    appends the parts, then sets `document_parts` to their log indices.
    """
    sha = hashlib.sha256(document).hexdigest()
    encoding, text = _encoded(document)
    obj: dict[str, Any] = {
        "v": VERSION, "route_id": route["route_id"], "model": route["model"],
        "provider": route["provider"], "upstream_model": route["upstream_model"],
        "kind": kind, "evidence": evidence, "binding": binding, "lease_id": lease_id,
        "verified_at": verified_at, "expires_at": expires_at, "nonce": nonce,
        "document_sha256": sha, "document_encoding": encoding, "document": text,
        "document_parts": [], "collateral": dict(collateral) if collateral else None,
        "facts": dict(facts), "time": time}
    if len(entry(obj)) <= MAX_ENTRY:
        return obj, []
    obj["document"] = None
    chunks = [document[i:i + PART_BYTES] for i in range(0, len(document), PART_BYTES)]
    parts = [{"v": PART_VERSION, "document_sha256": sha, "part": i, "parts": len(chunks),
              "data": base64.b64encode(c).decode()} for i, c in enumerate(chunks)]
    return obj, parts


def decode_document(obj: Mapping[str, Any]) -> bytes:
    """The inline document's bytes, checked against `document_sha256`."""
    text, encoding = obj.get("document"), obj.get("document_encoding")
    if not isinstance(text, str):
        raise EvidenceEntryError("malformed", "no inline document")
    if encoding == "utf-8":
        data = text.encode("utf-8", "surrogatepass")
    elif encoding == "base64":
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError as e:  # binascii.Error, or a str with non-ASCII characters
            raise EvidenceEntryError("malformed", "document is not base64") from e
    else:
        raise EvidenceEntryError("malformed", "unknown document_encoding")
    _check_sha(data, obj.get("document_sha256"))
    return data


def _check_sha(data: bytes, want: Any) -> None:
    if not isinstance(want, str) or not hmac.compare_digest(
            hashlib.sha256(data).hexdigest(), want):
        raise EvidenceEntryError("document_mismatch", "document bytes do not hash to "
                                 "document_sha256")


def join_parts(parts: Sequence[Mapping[str, Any]], document_sha256: str) -> bytes:
    """The document from its `pag-evidence-part/1` objects (in order), hash-checked."""
    data = b""
    for i, p in enumerate(parts):
        if not isinstance(p, Mapping) or p.get("v") != PART_VERSION or p.get("part") != i \
                or p.get("parts") != len(parts) or p.get("document_sha256") != document_sha256:
            raise EvidenceEntryError("document_mismatch", f"part {i} is not part {i} of "
                                     f"{len(parts)} of this document")
        try:
            data += base64.b64decode(str(p.get("data", "")), validate=True)
        except ValueError as e:  # binascii.Error, or a str with non-ASCII characters
            raise EvidenceEntryError("malformed", f"part {i} is not base64") from e
    _check_sha(data, document_sha256)
    return data


def parse(obj: Any) -> EvidenceEntry:
    """Check an evidence entry's shape; EvidenceEntryError(malformed) otherwise."""
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise EvidenceEntryError("malformed", "not a pag-evidence/1 object")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise EvidenceEntryError("malformed", f"evidence entry lacks {', '.join(missing)}")
    bad = [k for k in STRINGS if not isinstance(obj[k], str)]
    if bad:
        raise EvidenceEntryError("malformed", f"{bad[0]} is not a string")
    if not HEX64.fullmatch(obj["document_sha256"]):
        raise EvidenceEntryError("malformed", "document_sha256 is not 64 lower-case hex digits")
    parts = obj["document_parts"]
    if not isinstance(parts, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in parts):
        raise EvidenceEntryError("malformed", "document_parts is not a list of log indices")
    if (obj["document"] is None) == (not parts):
        raise EvidenceEntryError("malformed", "the document is either inline or in parts")
    if obj["document"] is not None and not isinstance(obj["document"], str):
        raise EvidenceEntryError("malformed", "document is not a string")
    if obj["collateral"] is not None and not isinstance(obj["collateral"], dict):
        raise EvidenceEntryError("malformed", "collateral is not an object or null")
    if not isinstance(obj["facts"], dict):
        raise EvidenceEntryError("malformed", "facts is not an object")
    return EvidenceEntry(obj, obj["route_id"], obj["kind"], obj["binding"], obj["nonce"],
                         obj["document_sha256"], tuple(parts))


def recheck(ev: EvidenceEntry, document: bytes, *, allow_simulated: bool = False,
            verify_quote: Callable[[bytes], Any] | None = None
            ) -> attestation.AttestationFacts:
    """Re-verify a logged document (see the module docstring); its facts, else
    EvidenceEntryError. Only kinds in `RECHECKABLE` can be; others: `unsupported_kind`."""
    _check_sha(document, ev.document_sha256)
    if ev.kind not in RECHECKABLE:
        raise EvidenceEntryError("unsupported_kind", f"{ev.kind!r} evidence cannot be "
                                 "re-checked offline by this module")
    try:
        doc = json.loads(document)
    except ValueError as e:
        raise EvidenceEntryError("malformed", "the dstack document is not JSON") from e
    if not isinstance(doc, dict):
        raise EvidenceEntryError("malformed", "the dstack document is not a JSON object")
    try:
        facts = attestation.check(doc, nonce=ev.nonce, allow_simulated=allow_simulated,
                                  verify_quote=verify_quote)
    except attestation.AttestationError as e:
        raise EvidenceEntryError("attestation_invalid", str(e)) from e
    want = "tls-spki:" + facts.keyset["tls_spki_sha256"]
    if ev.binding != want:
        raise EvidenceEntryError("binding_mismatch", "the lease's binding is not the TLS key "
                                 "the attestation names")
    for k in ("app_id", "compose_hash"):
        claimed = ev.obj["facts"].get(k)
        if claimed is not None and claimed != getattr(facts, k):
            raise EvidenceEntryError("attestation_invalid", f"the entry's {k} is not the "
                                     "attested one")
    return facts
