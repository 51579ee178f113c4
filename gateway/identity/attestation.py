"""Building the gateway's own attestation document (I/O: asks the dstack guest agent).

The document's format and the report-data rule are in verifier/tee/attestation.py,
where clients check it; this module only fills it in from a `GetQuote`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verifier.tee import eventlog, quote
from verifier.tee.attestation import DOC_VERSION, MAX_NONCE_LEN, report_data_for
from verifier.tee.keyset import keyset_hash


def _keyset_json(keyset: Any) -> dict[str, str]:
    if isinstance(keyset, Mapping):
        return dict(keyset)
    return dict(keyset.to_json())


async def build(client: Any, keyset: Any, nonce: str | None = None) -> dict[str, Any]:
    """Ask the guest agent for a quote over the keyset (and nonce); return the document.

    `client` is a `dstack_sdk.AsyncDstackClient`; `keyset` a `Keyset`,
    `GatewayKeys` or the keyset JSON object.
    """
    if nonce is not None and len(nonce) > MAX_NONCE_LEN:
        raise ValueError(f"nonce longer than {MAX_NONCE_LEN} characters")
    ks = _keyset_json(keyset)
    kh = keyset_hash(ks)
    rd = report_data_for(kh, nonce)
    resp = await client.get_quote(rd)
    raw = bytes.fromhex(resp.quote)
    facts = eventlog.replay(resp.event_log)
    doc: dict[str, Any] = {
        "v": DOC_VERSION,
        "quote": raw.hex(),
        "event_log": resp.event_log,
        "simulated": quote.is_simulated(raw),
        "app_id": facts.app_id,
        "compose_hash": facts.compose_hash,
        "instance_id": facts.instance_id,
        "key_provider": facts.key_provider,
        "keyset": ks,
        "keyset_hash": kh,
        "report_data": rd.hex(),
        "vm_config": getattr(resp, "vm_config", ""),
    }
    if nonce is not None:
        doc["nonce"] = nonce
    return doc
