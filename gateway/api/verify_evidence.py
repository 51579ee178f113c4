"""`python -m gateway verify-evidence --log URL --vkey VKEY --index N [...]`: re-verify the
upstream evidence a receipt names (`upstream.evidence_index`), from the log alone.

It reads the log's checkpoint (signed by `--vkey`, cosigned by `--quorum` of the
`--witness` keys; the quorum defaults to every witness given), then entry N and its
inclusion proof in that checkpoint's tree from the log's tiles, and each
`pag-evidence-part/1` entry the evidence entry names (same checks). It re-checks the
document offline with `verifier.evidence_entry.recheck` (kinds in `RECHECKABLE`: the
dstack kind: quote, report data binding the provider's keyset and the logged nonce, RTMR3
replay, the lease's TLS binding). Simulated quotes are accepted only with
`--allow-simulated`; a real quote needs `--collateral FILE` (QuoteCollateralV3 JSON valid
at the entry's `verified_at`), checked with dcap-qvl at that time.

Exit status 0 only when everything verified, 1 with a one-line reason otherwise, 2 on bad
usage. Nothing is trusted from the log server: a lying server can only make it fail.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any

import httpx

from tlog import checkpoint as tcheckpoint
from tlog import merkle, note, tiles
from verifier import evidence_entry
from verifier.tee import dcap
from witness import cosignature

MAX_RESOURCE = 1 << 20


class Failure(Exception):
    """The evidence did not re-verify; the message is the one-line reason."""


def fetcher(base: str, client: httpx.Client) -> Callable[[str], bytes]:
    """get(path) -> the log resource's bytes (Failure if absent or too large)."""
    def get(path: str) -> bytes:
        try:
            r = client.get(f"{base.rstrip('/')}/{path}")
        except httpx.HTTPError as e:
            raise Failure(f"{path}: {type(e).__name__}") from e
        if r.status_code != 200 or len(r.content) > MAX_RESOURCE:
            raise Failure(f"{path}: HTTP {r.status_code}")
        return r.content
    return get


def _tile(get: Callable[[str], bytes], level: int | None, index: int, size: int) -> bytes:
    count = size >> (tiles.HEIGHT * (level or 0))
    width = max(0, min(tiles.WIDTH, count - index * tiles.WIDTH))
    return get(tiles.entries_path(index, width) if level is None
               else tiles.path(level, index, width))


def read_entry(get: Callable[[str], bytes], index: int, cp: tcheckpoint.Checkpoint) -> bytes:
    """Entry `index`, proven included in the tree of the verified checkpoint `cp`."""
    if not 0 <= index < cp.size:
        raise Failure(f"index {index} is not in the log's tree of size {cp.size}")
    n, pos = divmod(index, tiles.WIDTH)
    try:
        bundle = tiles.decode_bundle(_tile(get, None, n, cp.size))
        entry = bundle[pos]
        cache: dict[tuple[int, int], bytes] = {}

        def node(level: int, idx: int) -> bytes:
            tl, ti, _, _ = tiles.locate(level, idx)
            if (tl, ti) not in cache:
                cache[(tl, ti)] = _tile(get, tl, ti, cp.size)
            return tiles.node_from_tile(cache[(tl, ti)], level, idx)

        path = merkle.prove_inclusion(index, cp.size, node)
        merkle.verify_inclusion(merkle.leaf_hash(entry), index, cp.size, path, cp.root_hash)
    except (tiles.TileError, merkle.ProofError, IndexError) as e:
        raise Failure(f"entry {index} is not proven in the checkpoint: {e}") from e
    return entry


def _epoch(text: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as e:
        raise Failure(f"verified_at {text[:40]!r} is not RFC 3339") from e


def verify(args: argparse.Namespace, client: httpx.Client) -> dict[str, Any]:
    """Re-verify entry `args.index`; what was proven, or Failure."""
    get = fetcher(args.log, client)
    try:
        witnesses = cosignature.parse_vkeys(args.witness)
        quorum = len(witnesses) if args.quorum is None else args.quorum
        cp = cosignature.verify_witnessed(get("checkpoint"), note.verifier_from_vkey(args.vkey),
                                          witnesses, quorum).checkpoint
    except ValueError as e:
        raise Failure(f"checkpoint: {e}") from e
    try:
        obj = json.loads(read_entry(get, args.index, cp))
        ev = evidence_entry.parse(obj)
        parts = [json.loads(read_entry(get, i, cp)) for i in ev.document_parts]
        document = ev.document(parts)
    except (ValueError, evidence_entry.EvidenceEntryError) as e:
        raise Failure(f"entry {args.index}: {e}") from e
    verify_quote = None
    if args.collateral:
        try:
            with open(args.collateral, encoding="utf-8") as f:
                col = dcap.load_collateral(f.read())
        except (OSError, dcap.DcapError) as e:
            raise Failure(f"collateral: {e}") from e
        at = _epoch(obj["verified_at"])

        def verify_quote(raw: bytes) -> dcap.DcapResult:
            return dcap.verify(raw, col, at)

    try:
        facts = evidence_entry.recheck(ev, document, allow_simulated=args.allow_simulated,
                                       verify_quote=verify_quote)
    except evidence_entry.EvidenceEntryError as e:
        raise Failure(f"entry {args.index}: {e}") from e
    return {"ok": True, "index": args.index, "route_id": ev.route_id, "kind": ev.kind,
            "evidence": obj["evidence"], "binding": ev.binding, "verified_at": obj["verified_at"],
            "app_id": facts.app_id, "compose_hash": facts.compose_hash,
            "simulated": facts.simulated, "witnesses": quorum,
            "tcb_status": getattr(facts.quote_verification, "tcb_status", None)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gateway verify-evidence`."""
    ap = argparse.ArgumentParser(prog="python -m gateway verify-evidence")
    ap.add_argument("--log", required=True, help="the log's base URL")
    ap.add_argument("--vkey", required=True, help="the log's verifier key")
    ap.add_argument("--index", required=True, type=int, help="the evidence entry's log index")
    ap.add_argument("--witness", action="append", default=[], metavar="VKEY")
    ap.add_argument("--quorum", type=int, help="default: every --witness")
    ap.add_argument("--allow-simulated", action="store_true")
    ap.add_argument("--collateral", help="QuoteCollateralV3 JSON for a real quote")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        with httpx.Client(timeout=30) as client:
            out = verify(args, client)
    except Failure as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        print(f"OK evidence entry {out['index']} of route {out['route_id']} ({out['kind']}): "
              f"quote, nonce-bound report data, RTMR3 and binding {out['binding']} re-verified; "
              f"app {out['app_id']}, compose {out['compose_hash']}"
              + ("; SIMULATED" if out["simulated"] else "")
              + ("; UNWITNESSED" if not out["witnesses"] else f"; {out['witnesses']} witness(es)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
