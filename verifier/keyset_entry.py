"""The keyset entry (`pag-keyset/1`): a gateway's attested keyset, logged before its
first receipt is signed with it (pure).

    {"v": "pag-keyset/1", "keyset": {...}, "keyset_hash": HEX,
     "attestation": {the /.well-known/attestation document, quote and event log},
     "checkpoint": "<the log's signed checkpoint the gateway saw, note text>",
     "app_id": STR, "compose_hash": HEX, "time": RFC3339,
     "app_compose": STR,                  # optional: the dstack app-compose document
     "image_digests": {IMAGE: "sha256:HEX"}}  # with app_compose: its digest-pinned images

Rules:
- The log entry is the RFC 8785 canonical bytes of the object.
- `attestation` was made with nonce `nonce_for(checkpoint)` (lower-case hex
  SHA-256 of "pag-keyset/1 nonce" ‖ 0x0A ‖ the checkpoint note bytes), so the
  quote provably postdates that checkpoint: nobody could have produced it
  before the log signed it.
- That checkpoint is of a tree the entry was appended to: its size is at most the
  entry's own index (a later size would be a tree this log did not have yet).
- `keyset`, `keyset_hash`, `app_id` and `compose_hash` equal the attested
  ones (what `verifier.tee.attestation.check` establishes from the quote and
  the replayed event log); nothing in the entry is trusted beyond that.
- A receipt's `keyset_index` names the log index of such an entry, which must
  come before the receipt in the log, and whose `keyset.receipt_signing_key`
  signed it.
- Release transparency: when the TEE reports its app-compose document, the
  entry carries it (`app_compose`) and the images it pins by digest
  (`image_digests`, image name to `sha256:` digest, as `image_digests` reads
  them from its `docker_compose_file`). The compose hash the quote attests is
  SHA-256 of that document, so the listing is as attested as the hash; an
  entry whose document does not hash to the attested compose hash, or whose
  listing is not the document's, is refused. `image_digests` without
  `app_compose` is an unverifiable claim and refused.

`check` is the one place a keyset entry is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785

from tlog import checkpoint as tcheckpoint
from tlog import note
from verifier.tee import attestation

VERSION = "pag-keyset/1"
NONCE_CONTEXT = b"pag-keyset/1 nonce\n"
REQUIRED = ("v", "keyset", "keyset_hash", "attestation", "checkpoint", "app_id",
            "compose_hash", "time")


class KeysetEntryError(ValueError):
    """A keyset entry that is malformed or does not verify. `code` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class KeysetFacts:
    """What a verified keyset entry establishes."""

    keyset: dict[str, str]
    keyset_hash: str
    receipt_signing_key: str  # base64, as in the keyset
    app_id: str
    compose_hash: str
    simulated: bool
    checkpoint_size: int
    measurements: dict[str, str]
    attestation: attestation.AttestationFacts


def _check_release(obj: Mapping[str, Any], compose_hash: str) -> None:
    """`app_compose` hashes to the attested compose hash; `image_digests` is its listing."""
    doc = obj.get("app_compose")
    if doc is None:
        if "image_digests" in obj:
            raise KeysetEntryError("release_mismatch", "image_digests without the app_compose "
                                   "document they come from")
        return
    if not isinstance(doc, str) or not hmac.compare_digest(
            hashlib.sha256(doc.encode("utf-8", "surrogatepass")).hexdigest(), compose_hash):
        raise KeysetEntryError("release_mismatch", "app_compose does not hash to the attested "
                               "compose hash")
    if obj.get("image_digests") != image_digests(doc):
        raise KeysetEntryError("release_mismatch", "image_digests is not the app_compose "
                               "document's listing")


def nonce_for(checkpoint_note: bytes) -> str:
    """The attestation nonce binding a keyset entry to the checkpoint it saw."""
    return hashlib.sha256(NONCE_CONTEXT + checkpoint_note).hexdigest()


def build(doc: Mapping[str, Any], checkpoint_note: bytes, time: str,
          app_compose: str | None = None) -> dict[str, Any]:
    """The entry for an attestation document made with `nonce_for(checkpoint_note)`; with
    the TEE's app-compose document, that document and the images it pins."""
    obj = {"v": VERSION, "keyset": dict(doc["keyset"]), "keyset_hash": doc["keyset_hash"],
           "attestation": dict(doc), "checkpoint": checkpoint_note.decode(),
           "app_id": doc["app_id"], "compose_hash": doc["compose_hash"], "time": time}
    if app_compose is not None:
        obj["app_compose"] = app_compose
        obj["image_digests"] = image_digests(app_compose)
    return obj


IMAGE_LINE = re.compile(r"""^\s*(?:-\s*)?image:\s*["']?([^"'\s#]+)""", re.MULTILINE)


def image_digests(app_compose: str) -> dict[str, str]:
    """The images a dstack app-compose document's `docker_compose_file` pins by digest
    (`image: NAME@sha256:HEX`), as {NAME: "sha256:HEX"}; images named by tag only are not
    listed (they pin nothing). {} for a document that is not app-compose JSON."""
    try:
        compose = json.loads(app_compose).get("docker_compose_file", "")
    except (ValueError, AttributeError):
        return {}
    out: dict[str, str] = {}
    for ref in IMAGE_LINE.findall(compose if isinstance(compose, str) else ""):
        name, sep, digest = ref.partition("@")
        if sep and re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            out[name] = digest
    return dict(sorted(out.items()))


def entry(obj: Mapping[str, Any]) -> bytes:
    """The log entry: RFC 8785 bytes of the keyset entry object."""
    return rfc8785.dumps(dict(obj))


def is_keyset_entry(obj: Any) -> bool:
    """Whether a parsed log entry claims to be a keyset entry."""
    return isinstance(obj, dict) and obj.get("v") == VERSION


def check(obj: Any, *, log_verifier: note.Verifier, allow_simulated: bool = False,
          app_id: str | None = None, compose_hash: str | None = None,
          measurements: tuple[Mapping[str, str], ...] = (),
          verify_quote: Callable[[bytes], Any] | None = None,
          index: int | None = None) -> KeysetFacts:
    """Verify a keyset entry under a policy; its facts or KeysetEntryError.

    The checkpoint must be signed by the log (`log_verifier`); the attestation
    must verify (simulated quotes only with `allow_simulated`; real quotes
    through `verify_quote`, e.g. dcap-qvl) with the nonce derived from that
    checkpoint; its keyset, app id and compose hash must be the entry's, and
    meet the pins given. `measurements` is a tuple of allowed sets (names
    `mr_td`, `rtmr0`..`rtmr3`); an empty set is refused, an empty tuple pins
    nothing. `index`, the entry's own log index when known: the checkpoint it names
    must be of a tree it was appended to (size at most `index`), not of a later one.

    Codes: malformed, checkpoint_invalid, attestation_invalid (the
    attestation's own code is in the message), keyset_mismatch,
    identity_mismatch, app_id_mismatch, compose_hash_mismatch,
    measurement_mismatch, release_mismatch.
    """
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise KeysetEntryError("malformed", "not a pag-keyset/1 object")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise KeysetEntryError("malformed", f"keyset entry lacks {', '.join(missing)}")
    cp_text = obj["checkpoint"]
    if not isinstance(cp_text, str) or not isinstance(obj["attestation"], dict):
        raise KeysetEntryError("malformed", "checkpoint must be text, attestation an object")
    try:
        cp, _ = tcheckpoint.open(cp_text.encode(), log_verifier)
    except (ValueError, UnicodeError) as e:
        raise KeysetEntryError("checkpoint_invalid", f"checkpoint: {e}") from e
    if index is not None and cp.size > index:
        raise KeysetEntryError("checkpoint_invalid", f"the entry at {index} names a checkpoint "
                               f"of size {cp.size}, from after it (another tree than this log's)")
    try:
        facts = attestation.check(obj["attestation"], nonce=nonce_for(cp_text.encode()),
                                  allow_simulated=allow_simulated, expected_app_id=app_id,
                                  expected_compose_hash=compose_hash, verify_quote=verify_quote)
    except attestation.AttestationError as e:
        code = e.code if e.code in ("app_id_mismatch", "compose_hash_mismatch") \
            else "attestation_invalid"
        raise KeysetEntryError(code, f"attestation: {e}") from e
    if obj["keyset"] != facts.keyset or not isinstance(obj["keyset_hash"], str) \
            or not obj["keyset_hash"].isascii() \
            or not hmac.compare_digest(obj["keyset_hash"], facts.keyset_hash):
        raise KeysetEntryError("keyset_mismatch", "the entry's keyset is not the attested one")
    if obj["app_id"] != facts.app_id or obj["compose_hash"] != facts.compose_hash:
        raise KeysetEntryError("identity_mismatch",
                               "the entry's app id or compose hash is not the attested one")
    _check_release(obj, facts.compose_hash)
    have = {"mr_td": facts.mr_td, "rtmr0": facts.rtmrs[0], "rtmr1": facts.rtmrs[1],
            "rtmr2": facts.rtmrs[2], "rtmr3": facts.rtmrs[3]}
    if measurements:
        if any(not m for m in measurements):
            raise KeysetEntryError("measurement_mismatch",
                                   "an empty measurement set would match every quote")
        if not any(all(have.get(k, "") == str(v).lower() for k, v in m.items())
                   for m in measurements):
            raise KeysetEntryError("measurement_mismatch",
                                   "the quote's measurements match no allowed set")
    return KeysetFacts(keyset=facts.keyset, keyset_hash=facts.keyset_hash,
                       receipt_signing_key=facts.keyset["receipt_signing_key"],
                       app_id=facts.app_id, compose_hash=facts.compose_hash,
                       simulated=facts.simulated, checkpoint_size=cp.size,
                       measurements=have, attestation=facts)
