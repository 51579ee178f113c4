"""Every release a gateway logged: its `pag-keyset/1` entries, each checked under a policy.

`list_releases` audits the whole log (verifier/audit.py: every tile and entry
bundle against the checkpoint, which must be signed by the log and cosigned by
the witness quorum) and checks each keyset entry it meets with
`receipt_check.trusted_keyset` (attestation bound to the log checkpoint it
names, simulated only if allowed, real quotes through dcap-qvl, pins). A
release is what such an entry attests: app id, compose hash, keyset and, when
the TEE reported its app-compose document, the image digests it pins. An
entry that fails the policy is listed with its refusal, never as verified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tlog import note
from verifier import audit as auditing
from verifier import keyset_entry, receipt_check
from witness import cosignature


@dataclass(frozen=True)
class Release:
    """One keyset entry and the verdict on it."""

    index: int
    time: str
    app_id: str
    compose_hash: str
    keyset_hash: str
    image_digests: dict[str, str] = field(default_factory=dict)
    simulated: bool = False
    refusal: str | None = None  # None: verified under the policy


def _release(index: int, obj: dict[str, Any], log_verifier: note.Verifier,
             policy: receipt_check.KeysetPolicy) -> Release:
    def text(k: str) -> str:
        return str(obj.get(k))[:80]

    try:
        ks = receipt_check.trusted_keyset(obj, index, log_verifier=log_verifier, policy=policy)
    except Exception as e:  # noqa: BLE001 - a hostile entry is listed as refused, never fatal
        reason = str(e) if isinstance(e, keyset_entry.KeysetEntryError) else \
            f"malformed: {type(e).__name__}"
        return Release(index, text("time"), text("app_id"), text("compose_hash"),
                       text("keyset_hash"), refusal=reason[:300])
    digests = obj.get("image_digests") if isinstance(obj.get("image_digests"), dict) else {}
    return Release(index, text("time"), ks.app_id, ks.compose_hash, ks.keyset_hash,
                   dict(digests), ks.simulated)


async def list_releases(fetcher: auditing.Fetcher, log_verifier: note.Verifier,
                        witnesses: list[cosignature.CosignatureVerifier], quorum: int,
                        policy: receipt_check.KeysetPolicy
                        ) -> tuple[auditing.State, list[Release]]:
    """(the audited log state, its releases in log order); AuditError if the log fails."""
    found: list[Release] = []

    def on_entry(index: int, entry: bytes) -> None:
        try:
            obj = json.loads(entry)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if keyset_entry.is_keyset_entry(obj):
            found.append(_release(index, obj, log_verifier, policy))

    state = await auditing.audit(fetcher, log_verifier, witnesses=witnesses, quorum=quorum,
                                 on_entry=on_entry)
    return state, found
