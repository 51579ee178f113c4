"""python -m verifier checkpoint|proof|audit|receipt|monitor — check, exit 0 only if it holds.

Every failure prints one line `verifier: <reason>` on stderr and exits 1
(2 for usage errors). `--json` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import httpx

from tlog import merkle, note, proof
from verifier import audit as auditing
from verifier import receipt, version
from verifier.source import SourceError, read_source
from verifier.tee import attestation
from witness import cosignature


class Failure(Exception):
    """A verification failure; its message is the one-line reason."""


def _key_text(value: str) -> str:
    """A vkey given inline or as a path to a file holding it."""
    p = Path(value)
    if "+" not in value or p.is_file():
        try:
            return p.read_text().strip()
        except OSError as e:
            raise Failure(f"cannot read key file {value}: {e.strerror}") from e
    return value.strip()


def _log_verifier(vkey: str) -> note.Ed25519Verifier:
    try:
        return note.verifier_from_vkey(_key_text(vkey))
    except note.NoteError as e:
        raise Failure(f"log key: {e}") from e


def _witnesses(args: argparse.Namespace) -> tuple[list[cosignature.CosignatureVerifier], int]:
    try:
        ws = [cosignature.verifier_from_vkey(_key_text(v)) for v in args.witness]
    except note.NoteError as e:
        raise Failure(f"witness key: {e}") from e
    quorum = len(ws) if args.quorum is None else args.quorum
    if quorum < 0:
        raise Failure("--quorum must not be negative")
    return ws, quorum


def _open_checkpoint(note_bytes: bytes, args: argparse.Namespace) -> cosignature.Witnessed:
    ws, quorum = _witnesses(args)
    try:
        return cosignature.verify_witnessed(note_bytes, _log_verifier(args.vkey), ws, quorum,
                                            origin=getattr(args, "origin", None))
    except (ValueError, cosignature.QuorumError) as e:
        raise Failure(f"checkpoint: {e}") from e


def cmd_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    w = _open_checkpoint(read_source(args.src), args)
    return {"ok": True, "origin": w.checkpoint.origin, "size": w.checkpoint.size,
            "root": w.checkpoint.root_hash.hex(), "cosigners": list(w.cosigners)}


def _receipt_summary(entry: bytes) -> dict[str, Any] | None:
    """The receipt in a proof's extra, verified, or None if the entry is not a receipt."""
    try:
        obj = json.loads(entry)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("v") != receipt.VERSION:
        return None
    try:
        receipt.verify(obj)
    except receipt.ReceiptError as e:
        raise Failure(f"receipt in proof: {e}") from e
    return obj


def cmd_proof(args: argparse.Namespace) -> dict[str, Any]:
    try:
        p = proof.parse(read_source(args.src))
    except proof.ProofFormatError as e:
        raise Failure(f"proof: {e}") from e
    w = _open_checkpoint(p.checkpoint, args)
    entry = p.extra
    if args.entry is not None:
        entry = read_source(args.entry)
    if entry is None and args.leaf_hash is None:
        raise Failure("proof carries no entry (extra); give --entry FILE or --leaf-hash HEX")
    try:
        if args.leaf_hash is not None:
            merkle.verify_inclusion(bytes.fromhex(args.leaf_hash), p.index, w.checkpoint.size,
                                    list(p.hashes), w.checkpoint.root_hash)
        else:
            proof.check_inclusion(p, w.checkpoint, entry)
    except (merkle.ProofError, ValueError) as e:
        raise Failure(f"inclusion: {e}") from e
    out: dict[str, Any] = {"ok": True, "origin": w.checkpoint.origin, "index": p.index,
                           "size": w.checkpoint.size, "cosigners": list(w.cosigners)}
    r = _receipt_summary(entry) if entry is not None else None
    if r is not None:
        out["receipt"] = _summary(r)
    return out


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    route, up = r.get("route", {}), r.get("upstream", {})
    return {"id": r.get("id"), "time": r.get("time"), "request_hash": r.get("request_hash"),
            "route": route.get("route_id"), "model": route.get("model"),
            "provider": route.get("provider"), "verified": up.get("verified"),
            "evidence": up.get("evidence"), "e2ee": r.get("e2ee", {}).get("mode"),
            "signing_key": r.get("signature", {}).get("key")}


def cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    ws, quorum = _witnesses(args)
    state = auditing.load_state(args.state)
    progress = auditing.progress_bar if (args.progress or sys.stderr.isatty()) else None

    async def run() -> auditing.State:
        fetcher = auditing.Fetcher(args.log)
        try:
            return await auditing.audit(fetcher, _log_verifier(args.vkey), witnesses=ws,
                                        quorum=quorum, state=state, progress=progress)
        finally:
            await fetcher.close()

    try:
        new = asyncio.run(run())
    except auditing.AuditError as e:
        raise Failure(str(e)) from e
    if args.state is not None:
        auditing.save_state(args.state, new)
    return {"ok": True, "origin": new.origin, "size": new.size, "root": new.root.hex(),
            "previous_size": state.size if state else 0}


def cmd_receipt(args: argparse.Namespace) -> dict[str, Any]:
    base = args.gateway.rstrip("/")
    nonce = secrets.token_hex(16)
    with httpx.Client(timeout=30) as c:
        try:
            doc = c.get(f"{base}/.well-known/attestation", params={"nonce": nonce}).json()
            r = c.get(f"{base}/v1/receipts/by-request-hash/{args.request_hash}")
        except (httpx.HTTPError, ValueError) as e:
            raise Failure(f"gateway: {e}") from e
    try:
        facts = attestation.check(doc, nonce=nonce, allow_simulated=args.allow_simulated)
    except attestation.AttestationError as e:
        raise Failure(f"attestation: {e}") from e
    if r.status_code != 200:
        raise Failure(f"receipt: gateway answered {r.status_code}")
    body = r.json()
    rec = body.get("receipt")
    keyset = doc["keyset"]
    try:
        receipt.verify(rec, base64.b64decode(keyset["receipt_signing_key"]))
    except (receipt.ReceiptError, ValueError, TypeError) as e:
        raise Failure(f"receipt: {e}") from e
    if rec.get("request_hash") != args.request_hash:
        raise Failure("receipt: it is for another request hash")
    if rec.get("gateway", {}).get("keyset_hash") != doc.get("keyset_hash"):
        raise Failure("receipt: it names another keyset than the attested one")
    if not body.get("proof"):
        raise Failure("receipt: not logged yet (no proof); try again shortly")
    try:
        p = proof.parse(body["proof"].encode())
    except proof.ProofFormatError as e:
        raise Failure(f"proof: {e}") from e
    args.vkey = keyset["log_vkey"]
    w = _open_checkpoint(p.checkpoint, args)
    try:
        proof.check_inclusion(p, w.checkpoint, receipt.entry(rec))
    except merkle.ProofError as e:
        raise Failure(f"inclusion: {e}") from e
    return {"ok": True, "simulated": facts.simulated, "app_id": facts.app_id,
            "index": p.index, "size": w.checkpoint.size, "cosigners": list(w.cosigners),
            "receipt": _summary(rec)}


def _human(cmd: str, out: dict[str, Any]) -> str:
    if cmd == "checkpoint":
        return (f"OK checkpoint {out['origin']} size {out['size']} root {out['root'][:16]}… "
                f"cosigned by {len(out['cosigners'])}")
    if cmd == "audit":
        return f"OK audit {out['origin']}: size {out['size']} (was {out['previous_size']}), root {out['root'][:16]}…"
    line = f"OK entry {out['index']} in {out.get('origin', 'the log')} size {out['size']}, " \
           f"cosigned by {len(out['cosigners'])}"
    r = out.get("receipt")
    if r:
        line += (f"\n   receipt {r['id']} at {r['time']}: route {r['route']} → provider "
                 f"{r['provider']} ({r['model']}), upstream verified={r['verified']} "
                 f"by {r['evidence']}, e2ee {r['e2ee']}")
    return line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m verifier")
    p.add_argument("--version", action="version", version=f"pag-verify {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, vkey: bool = True) -> None:
        if vkey:
            sp.add_argument("--vkey", required=True, help="log verifier key, or a file holding it")
        sp.add_argument("--witness", action="append", default=[], metavar="VKEY",
                        help="witness cosigner key (repeat); file or inline")
        sp.add_argument("--quorum", type=int, help="cosignatures required (default: all given)")
        sp.add_argument("--json", action="store_true", help="print a JSON result")

    c = sub.add_parser("checkpoint", help="verify a signed checkpoint")
    common(c)
    c.add_argument("--origin", help="required origin line")
    c.add_argument("src", help="file, - or URL")
    pr = sub.add_parser("proof", help="verify a c2sp.org/tlog-proof@v1")
    common(pr)
    pr.add_argument("--origin")
    pr.add_argument("--entry", help="the entry (file, - or URL) when the proof has no extra")
    pr.add_argument("--leaf-hash", help="hex leaf hash instead of an entry")
    pr.add_argument("src")
    a = sub.add_parser("audit", help="audit a whole C2SP tlog-tiles log")
    common(a)
    a.add_argument("--log", required=True, help="log base URL or directory")
    a.add_argument("--state", type=Path, help="state file to check against and update")
    a.add_argument("--progress", action="store_true")
    r = sub.add_parser("receipt", help="fetch and verify a gateway receipt and its proof")
    common(r, vkey=False)
    r.add_argument("--gateway", required=True)
    r.add_argument("--request-hash", required=True)
    r.add_argument("--allow-simulated", action="store_true",
                   help="accept a simulated (non-TEE) attestation")
    m = sub.add_parser("monitor", help="tail a log and check receipts against a policy")
    from verifier import monitor

    monitor.add_arguments(m)
    common(m)
    return p


COMMANDS = {"checkpoint": cmd_checkpoint, "proof": cmd_proof, "audit": cmd_audit,
            "receipt": cmd_receipt}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "monitor":
            from verifier import monitor

            return monitor.run(args)
        out = COMMANDS[args.cmd](args)
    except (Failure, SourceError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(e)}))
        print(f"verifier: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else _human(args.cmd, out))
    return 0
